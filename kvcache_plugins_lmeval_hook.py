"""Startup hook of kvcache-plugins for lm-eval (imported by ``kvcache_plugins_lmeval.pth`` at interpreter start).

It lets ``lm_eval --model hf --model_args pretrained=...,cache=<spec>`` use kvcache-plugins caches. It does
something only when the running program is lm-eval (the ``lm_eval``/``lm-eval`` console script, or
``python -m lm_eval`` including ``accelerate launch ... -m lm_eval`` workers): then it registers an import hook
that patches lm-eval's ``HFLM`` and ``evaluate`` right after lm-eval imports them. In every other program it only
checks ``sys.argv`` (well under a millisecond; it imports nothing but ``os`` and ``sys``).

``KVCACHE_PLUGINS_LM_EVAL=0`` switches it off; ``KVCACHE_PLUGINS_LM_EVAL=force`` switches it on in any program
(e.g. a script that calls ``lm_eval.simple_evaluate``). It never raises.
"""

import os
import sys

_PATCH = {
    "lm_eval.models.huggingface": "patch_hflm_module",
    "lm_eval.evaluator": "patch_evaluator_module",
}
_SCRIPTS = {"lm_eval", "lm-eval", "lm_eval.exe", "lm-eval.exe", "lm_eval-script.py", "lm-eval-script.py"}


def _runs_module(argv: list) -> str:
    """The module of ``python [options] -m <module> ...`` ('' otherwise)."""
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return ""
        if arg.startswith("--"):
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            return ""  # a script path
        flags = arg[1:]
        for j, flag in enumerate(flags):
            if flag == "m":
                rest = flags[j + 1 :]
                return rest if rest else (argv[i + 1] if i + 1 < len(argv) else "")
            if flag == "c":
                return ""
            if flag in "XW":
                i += 0 if flags[j + 1 :] else 1  # the value follows, glued or as the next argument
                break
        i += 1
    return ""


def is_lm_eval_process() -> bool:
    """Whether this interpreter is running lm-eval's CLI."""
    if sys.argv and os.path.basename(sys.argv[0]) in _SCRIPTS:
        return True
    module = _runs_module(list(getattr(sys, "orig_argv", []) or []))
    return module in ("lm_eval", "lm_eval.__main__")


class _PatchingLoader:
    def __init__(self, loader, name):
        self._loader, self._name = loader, name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        from kvcache_plugins.eval import lm_eval_hook_targets

        getattr(lm_eval_hook_targets, _PATCH[self._name])(module)

    def __getattr__(self, item):
        return getattr(self._loader, item)


class _Finder:
    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCH:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _PatchingLoader(spec.loader, fullname)
                return spec
        return None


def install() -> None:
    """Register the import hook if this is lm-eval (or forced); never raises."""
    try:
        mode = os.environ.get("KVCACHE_PLUGINS_LM_EVAL", "1").strip().lower()
        if mode in ("0", "false", "off", "no"):
            return
        if mode != "force" and not is_lm_eval_process():
            return
        if not any(isinstance(f, _Finder) for f in sys.meta_path):
            sys.meta_path.insert(0, _Finder())
    except Exception:  # a startup hook must never break the interpreter
        pass
