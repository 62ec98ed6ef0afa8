# Sourced with PY set (a Python whose torch is a CUDA build): puts the CUDA headers that torch's
# own headers need (e.g. cusparse.h, cublas_v2.h) on CPATH. The CUDA wheels ship them under
# nvidia/cu<major>/include (not nvidia/cusparselt etc.); a system toolkit may lack some of them.
# Returns 1, with CPATH unchanged, where the wheels are not there.
NV_INCLUDE="$("$PY" - <<'PYEOF'
import glob, os, sysconfig
found = sorted(glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "cu[0-9]*", "include")))
print(found[-1] if found else "")
PYEOF
)"
if [ -n "$NV_INCLUDE" ]; then
  export CPATH="$NV_INCLUDE${CPATH:+:$CPATH}"
else
  false
fi
