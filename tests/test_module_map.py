"""The module map of docs/design.md, kept by the code: every import of the
package (deferred ones included, read with ast) goes to a module on its own
row or above it, no imports form a cycle, and every module has a row."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hsee_jax"


def floors() -> dict:
  """Module -> its row in design.md's module map (0 = the top)."""
  text = (ROOT / "docs" / "design.md").read_text()
  rows = [l for l in text[text.index("## Module map"):].split("\n## ")[0].splitlines()
          if l.startswith("| `")]
  return {name.removesuffix(".py").removesuffix("/"): i for i, row in enumerate(rows)
          for name in re.findall(r"`([\w/*.]+)`", row.split("|")[1]) if "*" not in name}


def modules() -> dict:
  """Dotted name below hsee_jax (``config``, ``strategies.update``) -> file."""
  out = {}
  for f in PACKAGE.rglob("*.py"):
    parts = f.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    if parts and parts != ("__main__",):
      out[".".join(parts)] = f
  return out


def imports(path: Path, known: dict) -> set:
  """The package's modules that ``path`` imports, anywhere in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
        and node.module.split(".")[0] == "hsee_jax":
      base = node.module.split(".")[1:]
      for alias in node.names:
        sub = ".".join(base + [alias.name])
        found.add(sub if sub in known else ".".join(base))
    elif isinstance(node, ast.Import):
      found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("hsee_jax.")}
  return {m for m in found if m in known}


def test_imports_keep_the_module_map():
  rows, known = floors(), modules()
  top = lambda m: m.split(".")[0]
  assert {top(m) for m in known} <= set(rows), \
      f"modules without a row in design.md's map: {sorted({top(m) for m in known} - set(rows))}"
  graph = {m: imports(f, known) for m, f in known.items()}
  climbs = [f"{m} imports {d}" for m, deps in graph.items() for d in deps
            if rows[top(d)] > rows[top(m)]]
  assert not climbs, f"imports that climb the module map: {climbs}"
  assert not cycles(graph), f"import cycles: {cycles(graph)}"


def cycles(graph: dict) -> list:
  """The cycles a depth-first search meets (an edge back to a module on its path)."""
  state, found = {}, []
  def visit(m, path):
    state[m] = "open"
    for d in sorted(graph[m]):
      if state.get(d) == "open":
        found.append(" -> ".join(path[path.index(d):] + [d]))
      elif d not in state:
        visit(d, path + [d])
    state[m] = "done"
  for m in sorted(graph):
    if m not in state:
      visit(m, [m])
  return found


def test_the_check_catches_a_climb_and_a_cycle(tmp_path):
  """The parser sees deferred imports and the map's order."""
  known = {"config": None, "models": None, "rundir": None}
  f = tmp_path / "config.py"
  f.write_text("def load():\n  from hsee_jax.rundir import CONFIG\n  from hsee_jax import models\n")
  assert imports(f, known) == {"rundir", "models"}
  rows = floors()
  assert rows["rundir"] > rows["config"] > rows["models"]
  assert rows["strategies"] > rows["engine"] and rows["cli"] > rows["ray_sweep"] > rows["sweep"]
  assert rows["tune"] == rows["ray_sweep"]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a -> b -> c -> a"]
  assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
