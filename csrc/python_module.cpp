// Makes escape_fast._C an importable Python module; importing it runs the
// static TORCH_LIBRARY registrations of every linked source file.
#include <Python.h>

static struct PyModuleDef escape_fast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&escape_fast_module); }
