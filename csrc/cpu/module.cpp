// The Python module of one instruction-set build of the CPU kernels (setup.py compiles csrc/cpu/
// once per level, with -DMASKKERN_CPU_LEVEL=default|avx2|avx512): `import maskkern._cpu_<level>`
// loads the library, and its static registrations (TORCH_LIBRARY_IMPL in each kernel file)
// register that level's kernels. maskkern/_backend.py imports exactly one level.

#include <Python.h>

#define MASKKERN_CONCAT_(a, b) a##b
#define MASKKERN_CONCAT(a, b) MASKKERN_CONCAT_(a, b)
#define MASKKERN_STRING_(a) #a
#define MASKKERN_STRING(a) MASKKERN_STRING_(a)

PyMODINIT_FUNC MASKKERN_CONCAT(PyInit__cpu_, MASKKERN_CPU_LEVEL)(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_cpu_" MASKKERN_STRING(MASKKERN_CPU_LEVEL), nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
