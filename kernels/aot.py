"""Ahead-of-time compilation of a LaunchSpec for an NVIDIA GPU, on any machine: Triton's wheels ship ptxas,
and nothing here touches a device. The arguments are specialised by Triton's own JIT binder (ints equal to 1
become constants; pointers and ints divisible by 16 get divisibility hints), so the compiled variant is the
one a launch of the same spec on that GPU would compile. Uses Triton internals (the binder and
`JITFunction._pack_args`), so a Triton upgrade may need this file changed; the compile test will say so.

Needs TRITON_INTERPRET unset: under the interpreter `@triton.jit` builds an InterpretedFunction, which
cannot be compiled, and Triton's own library is interpreted too.
"""
from __future__ import annotations

from tidal.errors import BackendError

from .launch import LaunchSpec


def compile_launch(spec: LaunchSpec, arch: int):
    """Compile `spec`'s kernel for compute capability `arch` (80 for sm_80, 90 for sm_90) with the
    specialisation and options its launch would use. Returns Triton's CompiledKernel (`.asm["ptx"]`,
    `.asm["cubin"]`, `.metadata.shared`). Raises BackendError under the interpreter, and Triton's
    CompilationError where the kernel does not compile for that target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    if not isinstance(spec.kernel, JITFunction):
        name = getattr(spec.kernel, "__name__", spec.kernel)
        raise BackendError(f"{name} is a {type(spec.kernel).__name__}, "
                           "not a JITFunction: compile ahead of time in a process without TRITON_INTERPRET=1")
    kernel = spec.kernel
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(spec.constexprs, num_warps=spec.num_warps, num_stages=spec.num_stages)
    bound, specialization, options = binder(*spec.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=target, options=options.__dict__)
