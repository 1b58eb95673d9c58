// Placeholder until the copy engine lands: the module must exist for the build.
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "_native", "sllmfs native code", -1, nullptr};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&moduledef); }
