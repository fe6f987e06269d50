"""Import stubs for SimpleTuner 4.10.1's Flux LoRA benchmark.

SimpleTuner imports every model family's module at start-up (its config field registry asks each lazy model class
for MODEL_TYPE), and some modules import optional packages at module level (audio/video/text-processing models,
wandb, S3, ...). Those packages are not on the GPU image and are never used on the Flux LoRA path with
report_to=none. Instead of carrying hundreds of MB we register, for the exact top-level names in STUBBED below (and
only when that package is really not importable), a stub module: importing it and taking names from it works, but
calling/instantiating anything from it raises RuntimeError naming the stub. So if the Flux path ever really used one,
the run fails loudly instead of silently benchmarking something else.

Set ST_STUB_DISCOVER=1 to stub *any* missing module and print its name (used only to build the list here).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import types

STUBBED = set(filter(None, os.environ.get("ST_STUB_EXTRA", "").split(","))) | {
    # found by import discovery on the rehearsal machine (torch 2.11, transformers 5.17, diffusers 0.42.1)
    "wandb",  # trainer.py imports it at module level; report_to=none
    "boto3", "botocore",  # S3 data backend only
    "spacy", "py3langid", "pypinyin", "hangul_romanize", "num2words",  # ACE-Step lyric/text processing
    "music_vocoder",  # audio model family
    "loguru",  # ACE-Step / HunyuanVideo / MageFlow modules only
    "ftfy", "bs4",  # Wan / Sana / PixArt / Kandinsky prompt cleaning
    "skrample",  # scheduled-sampling adapter (not enabled)
}
_DISCOVER = os.environ.get("ST_STUB_DISCOVER") == "1"
_USED = []


def _raiser(qualname):
    def _fail(*a, **k):
        raise RuntimeError(f"benchmark stub: {qualname} was used; that package is stubbed for the SimpleTuner benchmark")
    return _fail


class _StubMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _make_class(f"{cls.__qualname__}.{name}")

    def __call__(cls, *a, **k):
        _raiser(cls.__qualname__)()

    def __or__(cls, other):
        return cls

    def __ror__(cls, other):
        return cls

    def __getitem__(cls, item):
        return cls


def _make_class(qualname):
    c = _StubMeta(qualname.rsplit(".", 1)[-1], (), {"__module__": "st_stub"})
    c.__qualname__ = qualname
    return c


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _make_class(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        m = _StubModule(spec.name)
        m.__path__ = []
        m.__benchmark_stub__ = True
        return m

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in sys.modules and getattr(sys.modules[top], "__benchmark_stub__", False):
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        if top not in STUBBED and not _DISCOVER:
            return None
        if fullname == top:
            # only stub when the real package is missing
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                try:
                    if finder.find_spec(fullname, path, target) is not None:
                        return None
                except Exception:
                    continue
            if _DISCOVER:
                print(f"[st_stubs] stubbing missing module: {fullname}", file=sys.stderr, flush=True)
            _USED.append(fullname)
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


def install():
    if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
        sys.meta_path.append(_StubFinder())
    return _USED
