// The Python module `qwen2_jax._cpu_kernels`: capsules of the XLA FFI handlers of the CPU kernels
// (`cpu_matmul.cc`, `cpu_attention.cc`, `cpu_logits.cc`) for `jax.ffi.register_ffi_target`, and the
// panel width of this CPU's matmul register kernel, whether the bf16x3 matmul has AMX, and the
// parallel loops' lingering helpers (`cpu_common.h`).

#include <Python.h>

#include "xla/ffi/api/ffi.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(Qwen2JaxPackedMatmul);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Qwen2JaxPackedMatmulBf16x3);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Qwen2JaxPackedSwigluBf16x3);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Qwen2JaxPackedMlpBf16x3);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Qwen2JaxPagedAttention);
XLA_FFI_DECLARE_HANDLER_SYMBOL(Qwen2JaxLogitRowStats);
int Qwen2JaxPanelWidth();
const char* Qwen2JaxIsa();
bool Qwen2JaxAmx();
void Qwen2JaxLoopStats(int64_t* loops, int64_t* handed);
int64_t Qwen2JaxLingerUs();

static PyObject* MatmulHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&Qwen2JaxPackedMatmul), nullptr, nullptr);
}

static PyObject* MatmulBf16x3Handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&Qwen2JaxPackedMatmulBf16x3), nullptr, nullptr);
}

static PyObject* SwigluBf16x3Handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&Qwen2JaxPackedSwigluBf16x3), nullptr, nullptr);
}

static PyObject* MlpBf16x3Handler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&Qwen2JaxPackedMlpBf16x3), nullptr, nullptr);
}

static PyObject* AttentionHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&Qwen2JaxPagedAttention), nullptr, nullptr);
}

static PyObject* LogitsHandler(PyObject*, PyObject*) {
  return PyCapsule_New(reinterpret_cast<void*>(&Qwen2JaxLogitRowStats), nullptr, nullptr);
}

static PyObject* PanelWidth(PyObject*, PyObject*) { return PyLong_FromLong(Qwen2JaxPanelWidth()); }

static PyObject* IsaName(PyObject*, PyObject*) { return PyUnicode_FromString(Qwen2JaxIsa()); }

static PyObject* Amx(PyObject*, PyObject*) { return PyBool_FromLong(Qwen2JaxAmx()); }

static PyObject* LoopStats(PyObject*, PyObject*) {
  int64_t loops = 0, handed = 0;
  Qwen2JaxLoopStats(&loops, &handed);
  return Py_BuildValue("(LL)", static_cast<long long>(loops), static_cast<long long>(handed));
}

static PyObject* LingerUs(PyObject*, PyObject*) { return PyLong_FromLongLong(Qwen2JaxLingerUs()); }

static PyMethodDef kMethods[] = {
    {"matmul_handler", MatmulHandler, METH_NOARGS,
     "The XLA FFI handler of the prepacked matmul (a capsule)."},
    {"matmul_bf16x3_handler", MatmulBf16x3Handler, METH_NOARGS,
     "The XLA FFI handler of the prepacked bf16x3 matmul (a capsule)."},
    {"swiglu_bf16x3_handler", SwigluBf16x3Handler, METH_NOARGS,
     "The XLA FFI handler of the prepacked bf16x3 gate/up matmul with SwiGLU (a capsule)."},
    {"mlp_bf16x3_handler", MlpBf16x3Handler, METH_NOARGS,
     "The XLA FFI handler of the prepacked bf16x3 SwiGLU MLP (a capsule)."},
    {"attention_handler", AttentionHandler, METH_NOARGS,
     "The XLA FFI handler of the ragged paged attention (a capsule)."},
    {"logits_handler", LogitsHandler, METH_NOARGS,
     "The XLA FFI handler of the sampler's logit row statistics (a capsule)."},
    {"panel_width", PanelWidth, METH_NOARGS,
     "Panel width NR of this CPU's matmul register kernel: 32 (AVX-512), 16 (AVX2+FMA), 0."},
    {"isa", IsaName, METH_NOARGS,
     "The instruction set the kernels run: 'avx512', 'avx2' or 'generic' (the widest this CPU "
     "has, or a narrower one named by QWEN2_JAX_CPU_ISA)."},
    {"amx", Amx, METH_NOARGS,
     "Whether the bf16x3 matmul runs on AMX tiles here (the CPU has AMX-BF16, the OS grants "
     "the tile state, QWEN2_JAX_CPU_ISA is unset or 'amx')."},
    {"loop_stats", LoopStats, METH_NOARGS,
     "(loops, handed): the kernels' parallel loops that asked for helper threads so far in this "
     "process, and how many of them a lingering helper joined instead of a new pool task."},
    {"linger_us", LingerUs, METH_NOARGS,
     "How long a helper thread waits for the next parallel loop, in us (QWEN2_JAX_CPU_LINGER_US, "
     "default 200; 0: it returns to XLA's pool at once)."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_cpu_kernels",
    "fp32 CPU kernels for the generation engines (XLA FFI custom calls).", -1, kMethods,
    nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__cpu_kernels(void) { return PyModule_Create(&kModule); }
