"""The layers: the core (``ta_opd``) never imports verl, Ray, vLLM, pandas or matplotlib, nor its
own tools (it must stay testable in milliseconds on CPU); ``ta_opd.tools`` never imports the recipe."""

import pkgutil
import subprocess
import sys
from pathlib import Path

import ta_opd

CORE = sorted(m.name for m in pkgutil.iter_modules(ta_opd.__path__) if m.name != "tools")


def _loaded_after(imports: str) -> set[str]:
    code = f"import sys\n{imports}\nprint(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} | "\
           f"{{m for m in sys.modules if m.startswith('ta_opd.tools') or m.startswith('recipe')}})))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_the_core_is_every_top_level_module():
    assert {"stats", "support", "normalize", "selectors", "budget", "select", "losses", "metrics", "kl",
            "teacher_outputs", "vocab", "rollout", "distributed", "config"} <= set(CORE)


def test_core_imports_no_framework_no_dataframes_no_tools():
    loaded = _loaded_after("\n".join(f"import ta_opd.{m}" for m in CORE))
    bad = sorted(m for m in loaded if m in ("verl", "ray", "vllm", "pandas", "matplotlib", "recipe")
                 or m.startswith("ta_opd.tools"))
    assert not bad, bad


def test_tools_never_import_the_recipe():
    tools = Path(ta_opd.__file__).parent / "tools"
    mods = sorted("ta_opd.tools." + ".".join(p.relative_to(tools).with_suffix("").parts).removesuffix(".__init__")
                  .removesuffix(".__main__") for p in tools.rglob("*.py"))
    loaded = _loaded_after("\n".join(f"import {m.rstrip('.')}" for m in mods))
    assert not {m for m in loaded if m in ("verl", "ray", "vllm", "recipe")}, loaded
