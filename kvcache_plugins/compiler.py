"""Compiled kernels, called straight: the shared machinery of the decode hot path's compiled functions.

A kernel here is a plain PyTorch function (keyword-only static arguments, positional tensor arguments, a flat
tuple of tensors or ``None`` returned) compiled by ``torch.compile`` (inductor: C++ on CPU, Triton on CUDA) with its
token and batch sizes dynamic, so a growing cache never recompiles.

Calling a ``torch.compile``'d function costs dynamo's per-call work before the compiled code runs: evaluating every
guard of every input (dtype, device, sizes, strides, shape relations) and the wrapper frames: measured at 60 us
per call alone and about 270 us inside a decoding model on a 2-core CPU, as much as the attention itself over 2k
tokens. A decode step calls the kernels twice per layer, so :class:`Kernel` calls dynamo only for an input
*signature* (every tensor's dtype, device, sizes and strides, and whether they are inference tensors) it has not
seen, and afterwards calls the code inductor produced for that signature directly. That is exactly what dynamo
would run: a signature seen before passed dynamo's guards with the same compiled entry, and guards depend only on
what the signature holds (kernels close over no global state; their static arguments are baked into the function).
Calls without autograd run under ``torch.inference_mode``; with grad enabled every call goes through dynamo.

The first direct call of each compiled entry is checked against dynamo's result (equal outputs, bit for bit); if
the compiled artefact cannot be mapped to the inputs (another torch version naming things differently, say), the
kernel keeps calling through dynamo, which is slower but equally correct.

Compilation failures: :func:`call_kernel` turns the first failing compilation into one ``RuntimeWarning`` and
``None`` (callers then take their eager or reference path) and remembers it for the rest of the process.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import time
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

#: dynamo entries one kernel may hold: one per specialisation met (batch 1 or more, one new token or more, one
#: full-precision token or more, inference tensors or not), each compiled once
RECOMPILE_LIMIT = 32

#: compile the kernels (``KVCACHE_PLUGINS_COMPILE=0`` runs the same math eagerly: slow, for tests and debugging)
COMPILE = os.environ.get("KVCACHE_PLUGINS_COMPILE", "1") != "0"

_broken: list[str] = []  # why the compiler failed, once it did
_over_limit: set[str] = set()  # kernels that hit the recompile limit (warned once each)

#: seconds spent in the first call of each compiled variant (compilation included), by kernel name and variant
compile_seconds: dict[tuple, float] = {}


def compiler_broken() -> str | None:
    """Why compiled kernels are off in this process (``None`` while they work)."""
    return _broken[0] if _broken else None


def _no_duck_shapes():
    """Sizes that happen to be equal in the first call (batch, full-precision tokens) stay independent symbols, so
    no later call recompiles."""
    from torch.fx.experimental import _config as fx_config

    return fx_config.patch(use_duck_shape=False)


@dataclass(eq=False)  # entries compare by identity
class _Entry:
    """One compiled artefact (what dynamo's backend got) and how to feed it."""

    fn: Callable
    plan: list[Callable[[tuple], object]]  # per graph input: its value from the kernel's arguments
    #: per argument as traced: dtype, device, sizes, strides (ints or sympy expressions); None: not a graph input
    fake: list[tuple[torch.dtype, torch.device, tuple[object, ...], tuple[object, ...]] | None]
    outputs: int
    #: traced with inference tensors (made under ``inference_mode``): dynamo compiles those apart from normal ones
    inference: bool = False
    #: per returned item, whether it is ``None`` (learnt from dynamo's result when the entry is checked)
    nones: tuple[bool, ...] | None = None

    def accepts(self, args: tuple[torch.Tensor, ...]) -> bool:
        """Whether ``args`` fit this entry's traced tensors: dtypes, devices, inference or not; static sizes and
        strides equal; symbolic ones consistent (symbolic sizes at least 2: dynamo specialises sizes 0 and 1, so a
        symbolic size never stands for them); sizes and strides that are expressions of others evaluate equal."""
        if args[0].is_inference() != self.inference:
            return False
        seen: dict[object, int] = {}
        derived = []
        for t, fake in zip(args, self.fake):
            if fake is None:
                continue
            dtype, device, sizes, strides = fake
            if t.dtype != dtype or t.device.type != device.type or t.dim() != len(sizes):
                return False
            pairs = [(h, w, True) for h, w in zip(t.shape, sizes)]
            pairs += [(h, w, False) for h, w in zip(t.stride(), strides)]
            for have, want, is_size in pairs:
                if isinstance(want, int):
                    if have != want:
                        return False
                elif not want.is_Symbol:
                    derived.append((have, want))  # e.g. the mask's columns: stored tokens + full-precision ones
                elif (is_size and have < 2) or seen.setdefault(want, have) != have:
                    return False
        return all(want.free_symbols <= seen.keys() and int(want.subs(seen)) == have for have, want in derived)

    def __call__(self, args: tuple[torch.Tensor, ...]) -> tuple:
        outs = iter(self.fn(*[get(args) for get in self.plan]))
        return tuple(None if none else next(outs) for none in self.nones)


class Kernel:
    """``fn`` compiled once for the static keyword arguments ``statics`` (see the module docstring).

    Args:
        fn: the kernel; positional tensor arguments, keyword-only static arguments, returns a flat tuple of tensors
            or ``None``.
        name: a name; a number makes it unique in the process (dynamo keeps compiled variants and its recompile
            limit per code object: one code object per kernel, so kernels never evict or count against each other).
        statics: values of ``fn``'s keyword-only arguments.
        dynamic: ``(argument index, dim)`` pairs marked dynamic; dims may be negative.
        options: inductor config patches for this kernel.
    """

    #: every kernel made in this process (for tests and benchmarks)
    _all: list[Kernel] = []
    #: call compiled code straight for signatures seen before (``False`` within :func:`no_direct_calls`)
    direct_calls = True

    def __init__(
        self,
        fn: Callable,
        name: str,
        statics: dict[str, object],
        dynamic: list[tuple[int, int]],
        options: dict[str, object] | None = None,
    ) -> None:
        name = f"{name}_{len(Kernel._all)}"  # unique in the process
        code = fn.__code__.replace(co_name=name)
        traced = types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)
        traced.__kwdefaults__ = dict(statics)
        self.name = name
        self.argnames = code.co_varnames[: code.co_argcount]
        self.dynamic = dynamic
        self.options = dict(options or {})
        self._compiled = torch.compile(traced, backend=self._backend, fullgraph=True, dynamic=False)
        self._entries: list[_Entry] = []
        self._direct: dict[tuple, _Entry] = {}
        self._fresh: _Entry | None = None
        #: calls that ran through dynamo (a signature not seen before, or no direct entry)
        self.guarded_calls = 0
        Kernel._all.append(self)

    # ---------------------------------------------------------------- compile
    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, example_inputs, config_patches=self.options or None)
        try:
            self._fresh = self._entry(gm, fn)
        except _Unmapped as exc:
            logger.debug("kvcache_plugins: kernel %s is called through dynamo: %s", self.name, exc)
            self._fresh = None
        return fn

    @staticmethod
    def _size_source(symbol, nodes: list, by_name: dict[str, int]) -> Callable[[tuple], int]:
        """Where a symbolic graph input comes from: a size, a stride or the storage offset of an argument (views of
        one buffer, such as the paired key/value stream's halves, have symbolic strides and offsets)."""

        def expr(v: object) -> object:
            return v.node.expr if isinstance(v, torch.SymInt) else v

        for node in nodes:
            value = node.meta.get("example_value")
            if not isinstance(value, torch.Tensor):
                continue
            i = by_name[node.name]
            for d, size in enumerate(value.shape):
                if expr(size) == symbol:
                    return lambda args, i=i, d=d: args[i].shape[d]
            for d, stride in enumerate(value.stride()):
                if expr(stride) == symbol:
                    return lambda args, i=i, d=d: args[i].stride(d)
            if expr(value.storage_offset()) == symbol:
                return lambda args, i=i: args[i].storage_offset()
        raise _Unmapped(f"symbol {symbol} is not a size, stride or offset of an argument")

    def _entry(self, gm: torch.fx.GraphModule, fn: Callable) -> _Entry:
        """Map the graph's inputs to the kernel's arguments: tensors by dynamo's placeholder names (``L['q']`` becomes
        ``l_q_``), sizes by the traced tensor dim that carries the same symbol."""
        by_name = {f"l_{a}_": i for i, a in enumerate(self.argnames)}
        fake: list = [None] * len(self.argnames)
        nodes = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node in nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                if node.name not in by_name:
                    raise _Unmapped(f"graph input {node.name!r} is not an argument")
                fake[by_name[node.name]] = (value.dtype, value.device, _exprs(value.shape), _exprs(value.stride()))
        plan: list[Callable[[tuple], object]] = []
        for node in nodes:
            value = node.meta.get("example_value")
            if isinstance(value, torch.Tensor):
                plan.append(operator.itemgetter(by_name[node.name]))
            elif isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
                plan.append(self._size_source(value.node.expr, nodes, by_name))
            else:
                raise _Unmapped(f"graph input {node.name!r} of type {type(value).__name__}")
        output = next(n for n in gm.graph.nodes if n.op == "output")
        outs = output.args[0]
        return _Entry(fn, plan, fake, len(outs) if isinstance(outs, (tuple, list)) else 1)

    # ------------------------------------------------------------------- call
    def through_dynamo(self, *args: torch.Tensor) -> tuple:
        """The call as ``torch.compile`` makes it (guards evaluated; compiles a new variant if none fits)."""
        with _no_duck_shapes(), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            return self._compiled(*args)

    def _signature(self, args: tuple[torch.Tensor, ...]) -> tuple:
        return (args[0].is_inference(), *[(t.dtype, t.device, t.shape, t.stride()) for t in args])

    def __call__(self, *args: torch.Tensor) -> tuple:
        if torch.is_grad_enabled():
            return self.through_dynamo(*args)  # autograd may record the kernel: only dynamo's own call is right
        # without autograd, always run as under inference_mode: no_grad (generate) and inference_mode (benchmarks,
        # servers) then share one compiled variant, which a warm-up in either mode compiles for both
        with torch.inference_mode():
            if not Kernel.direct_calls:
                return self.through_dynamo(*args)
            sig = self._signature(args)
            entry = self._direct.get(sig)
            if entry is not None:
                return entry(args)
            return self._guarded(args, sig)

    def _guarded(self, args: tuple[torch.Tensor, ...], sig: tuple) -> tuple:
        self.guarded_calls += 1
        for i, d in self.dynamic:
            torch._dynamo.maybe_mark_dynamic(args[i], d % args[i].dim())
        self._fresh = None
        result = self.through_dynamo(*args)
        if self._fresh is not None:
            fresh = self._fresh
            fresh.inference = args[0].is_inference()
            # an entry traced alike replaces the old one (dynamo recompiles it after torch._dynamo.reset())
            stale = [e for e in self._entries if (e.fake, e.inference) == (fresh.fake, fresh.inference)]
            self._entries = [e for e in self._entries if e not in stale] + [fresh]
            self._direct = {k: e for k, e in self._direct.items() if e not in stale}
        fits = [e for e in self._entries if e.accepts(args)]
        if len(fits) != 1:
            return result
        entry = fits[0]
        if entry.nones is None:
            if not isinstance(result, tuple) or sum(x is not None for x in result) != entry.outputs:
                self._entries.remove(entry)
                return result
            entry.nones = tuple(x is None for x in result)
            try:
                direct = entry(args)
            except Exception as exc:  # noqa: BLE001 - an artefact we cannot call: keep calling through dynamo
                logger.debug("kvcache_plugins: kernel %s stays on dynamo: %s", self.name, exc)
                self._entries.remove(entry)
                return result
            if not _same(direct, result):
                logger.debug("kvcache_plugins: kernel %s stays on dynamo: direct call differs", self.name)
                self._entries.remove(entry)
                return result
        self._direct[sig] = entry
        return result


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(
        (x is None and y is None)
        or (x is not None and y is not None and x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y))
        for x, y in zip(a, b)
    )


def _exprs(values: tuple) -> tuple:
    """Traced sizes or strides as ints (static) or sympy expressions (symbolic)."""
    out = []
    for v in values:
        e = v.node.expr if isinstance(v, torch.SymInt) else int(v)
        out.append(int(e) if not isinstance(e, int) and e.is_number else e)
    return tuple(out)


class _Unmapped(Exception):
    """The compiled artefact's inputs cannot be mapped to the kernel's arguments."""


def call_kernel(kernel: Kernel, args: tuple[torch.Tensor, ...], variant: tuple) -> tuple | None:
    """``kernel(*args)``, or ``None`` after one ``RuntimeWarning`` if the compiler fails (then and for the rest of
    the process). The first call of each ``variant`` (the caller's key: what the compiler specialises on) is timed
    into :data:`compile_seconds`."""
    if _broken:
        return None
    first = variant not in compile_seconds
    t0 = time.perf_counter()
    try:
        out = kernel(*args)
    except Exception as exc:  # noqa: BLE001 - a compiler that fails here means: take the eager path
        if "RecompileLimit" in type(exc).__name__:  # the compiler works; this kernel met too many shapes
            if kernel.name not in _over_limit:
                _over_limit.add(kernel.name)
                warnings.warn(
                    f"kvcache_plugins: kernel {kernel.name} met more than {RECOMPILE_LIMIT} input specialisations; "
                    "calls it has no compiled variant for take the reference path",
                    RuntimeWarning,
                    stacklevel=3,
                )
            return None
        if not first:
            raise
        _broken.append(f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
        warnings.warn(
            "kvcache_plugins: torch.compile failed, so quantized caches decode through the reference path "
            f"(eager quantization; dequantize, then the model's attention). Reason: {_broken[0]}",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    if first:
        compile_seconds[variant] = time.perf_counter() - t0
        logger.info("kvcache_plugins: compiled kernel %s in %.1f s", kernel.name, compile_seconds[variant])
    return out


@contextlib.contextmanager
def no_direct_calls():
    """Within this context every kernel call goes through dynamo (for tests comparing both)."""
    Kernel.direct_calls = False
    try:
        yield
    finally:
        Kernel.direct_calls = True
