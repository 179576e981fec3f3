"""Checks that need no daemon: every SQL statement in ``src/`` is parameterised, and the
systemd unit runs the daemon unprivileged with a read-only view of the system.

The SQL check is a small taint analysis over the AST, not a grep: every argument that
reaches ``execute``/``executemany``/``executescript``/``execute_fetchall`` (directly, or
through a helper that passes one of its parameters on as SQL) must be built only from
literals, module constants, numbers coerced with ``int()``/``float()``, and locals and
comprehension variables built from those. A function parameter, an attribute or any other
value flowing into the SQL text is reported. The check is run on a hostile snippet first, so
a checker that finds nothing cannot pass.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

from .core import Row

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
UNIT = ROOT / "systemd" / "contimg.service"
ENV_FILE = ROOT / "systemd" / "contimg.env"

SINK_METHODS = {"execute": 0, "executemany": 0, "executescript": 0, "execute_fetchall": 0,
                "execute_insert": 0}
_COERCE = {"int", "float", "len", "bool", "round"}
_SAFE_METHODS = {"join", "format", "items", "keys", "values", "strip", "upper", "lower"}

HOSTILE_SNIPPET = '''
async def _one(db, sql, args=()):
    return await db.execute_fetchall(sql, args)

async def bad(db, group_id, table):
    await db.execute(f"SELECT * FROM groups WHERE id = '{group_id}'")
    await db.execute("SELECT * FROM groups WHERE id = '%s'" % group_id)
    await db.execute("SELECT * FROM groups WHERE id = '{}'".format(group_id))
    await db.execute("SELECT * FROM groups WHERE id = '" + group_id + "'")
    sql = "SELECT * FROM " + table
    await _one(db, sql)
    where = []
    where.append(f"id = '{group_id}'")
    await db.execute("SELECT * FROM groups WHERE " + " AND ".join(where))
    await db.execute("SELECT * FROM groups WHERE id = ?", (group_id,))
    await run_all(db, {1: (f"DROP TABLE {table}",)})
    await run_all(db, MIGRATIONS)

MIGRATIONS = {1: ("CREATE TABLE t (x)",)}

async def run_all(db, migrations):
    for version in sorted(migrations):
        for statement in migrations[version]:
            await db.execute(statement)
'''
HOSTILE_FINDINGS = 7  # all but the bound parameter and the constant migrations


class _Module:
    def __init__(self, path: Path, tree: ast.Module) -> None:
        self.path = path
        self.tree = tree
        self.constants: dict[str, ast.expr] = {}
        for node in tree.body:
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if isinstance(t, ast.Name):
                        self.constants[t.id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                self.constants[node.target.id] = node.value


def _functions(tree: ast.AST) -> Iterable[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _own_nodes(fn: ast.AST) -> Iterable[ast.AST]:
    """Nodes of a function body, not descending into nested functions or classes."""
    todo = list(ast.iter_child_nodes(fn))
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda):
            todo.extend(ast.iter_child_nodes(node))


def _params(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    a = fn.args
    return [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)] + (
        [a.vararg.arg] if a.vararg else []) + ([a.kwarg.arg] if a.kwarg else [])


class SqlChecker:
    def __init__(self, modules: dict[Path, str]) -> None:
        self.modules = {p: _Module(p, ast.parse(text, str(p))) for p, text in modules.items()}
        self.constants: dict[str, ast.expr] = {}
        for m in self.modules.values():
            for k, v in m.constants.items():
                self.constants.setdefault(k, v)
        # sink name -> {parameter name: positional index (self excluded)}, whether a method
        self.sinks: dict[str, tuple[dict[str, int], bool]] = {
            k: ({"sql": v}, False) for k, v in SINK_METHODS.items()}
        self.calls = 0

    # ------------------------------------------------------------------ sinks
    def _sql_args(self, call: ast.Call) -> list[ast.expr]:
        """The arguments of a call that end up in SQL text (empty: not a sink)."""
        f = call.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
        if name not in self.sinks:
            return []
        params, method = self.sinks[name]
        out = []
        for pname, index in params.items():
            if method and isinstance(f, ast.Name):
                index += 1  # a method called as a plain function: self is explicit
            kw = [k.value for k in call.keywords if k.arg == pname]
            if kw:
                out.append(kw[0])
            elif len(call.args) > index and not isinstance(call.args[index], ast.Starred):
                out.append(call.args[index])
        return out

    def _origin(self, arg: ast.AST, fn: ast.FunctionDef | ast.AsyncFunctionDef,
                seen: frozenset = frozenset()) -> str | None:
        """The parameter of ``fn`` that ``arg`` *is* (whole, or an element of it: ``p``,
        ``p[k]``, a loop variable over ``p`` ...), else None. Such a helper takes SQL from its
        caller (``_one(db, sql)``, a table of migration statements) and the caller is
        checked; a parameter *embedded* into SQL text (f-string, +, %, format, join) never
        is: values must be bound, not interpolated."""
        if isinstance(arg, ast.Subscript):
            return self._origin(arg.value, fn, seen)
        if isinstance(arg, ast.Call) and isinstance(arg.func, ast.Name) and arg.func.id in (
                "sorted", "list", "tuple", "iter", "reversed") and arg.args:
            return self._origin(arg.args[0], fn, seen)
        if not isinstance(arg, ast.Name) or arg.id in seen:
            return None
        if arg.id in _params(fn):
            return arg.id
        binds = self._bindings(fn, arg.id)
        origins = {self._origin(v, fn, seen | {arg.id}) for _, v in binds}
        return origins.pop() if len(origins) == 1 and binds else None

    def _discover_sinks(self) -> None:
        """A function whose SQL derives from its parameters is itself a sink for those."""
        changed = True
        while changed:
            changed = False
            for m in self.modules.values():
                for fn in _functions(m.tree):
                    params = _params(fn)
                    method = bool(params) and params[0] in ("self", "cls")
                    known = dict(self.sinks.get(fn.name, ({}, method))[0])
                    for node in _own_nodes(fn):
                        if not isinstance(node, ast.Call):
                            continue
                        for arg in self._sql_args(node):
                            p = self._origin(arg, fn)
                            if p is not None and p not in known:
                                known[p] = params.index(p) - (1 if method else 0)
                                changed = True
                    if known and fn.name not in SINK_METHODS:
                        self.sinks[fn.name] = (known, method)

    # ------------------------------------------------------------------ trust
    def _bindings(self, fn: ast.AST, name: str) -> list[tuple[str, ast.expr]]:
        out: list[tuple[str, ast.expr]] = []
        for node in _own_nodes(fn):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(t)):
                        out.append(("value" if isinstance(t, ast.Name) else "element", node.value))
            elif isinstance(node, ast.AugAssign | ast.AnnAssign):
                if isinstance(node.target, ast.Name) and node.target.id == name and node.value:
                    out.append(("value", node.value))
            elif isinstance(node, ast.For | ast.AsyncFor | ast.comprehension):
                if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(node.target)):
                    out.append(("element", node.iter))
            elif isinstance(node, ast.withitem) and node.optional_vars is not None:
                if any(isinstance(n, ast.Name) and n.id == name
                       for n in ast.walk(node.optional_vars)):
                    out.append(("value", node.context_expr))
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == name
                  and node.func.attr in ("append", "extend", "insert", "add", "update")):
                out.extend(("value", a) for a in node.args)
        return out

    def trusted(self, node: ast.AST, fn: ast.AST | None, seen: frozenset = frozenset()) -> bool:
        """Whether ``node`` is built only from literals, constants, coerced numbers and
        locals made of those (a function parameter never is)."""
        t = self.trusted
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, ast.JoinedStr):
            return all(t(v.value, fn, seen) for v in node.values if isinstance(v, ast.FormattedValue))
        if isinstance(node, ast.FormattedValue):
            return t(node.value, fn, seen)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add | ast.Mod | ast.Mult):
            return t(node.left, fn, seen) and t(node.right, fn, seen)
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            return all(t(e, fn, seen) for e in node.elts)
        if isinstance(node, ast.Dict):
            return all(t(v, fn, seen) for v in (*node.keys, *node.values) if v is not None)
        if isinstance(node, ast.IfExp):
            return t(node.body, fn, seen) and t(node.orelse, fn, seen)
        if isinstance(node, ast.Subscript):
            return t(node.value, fn, seen)  # picking among trusted values
        if isinstance(node, ast.GeneratorExp | ast.ListComp | ast.SetComp):
            inner = seen | {g.target.id for g in node.generators if isinstance(g.target, ast.Name)
                            and t(g.iter, fn, seen)}
            return (all(t(g.iter, fn, seen) for g in node.generators)
                    and t(node.elt, fn, inner))
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in _COERCE:
                return True
            if isinstance(f, ast.Name) and f.id in ("range", "sorted", "tuple", "list"):
                return all(t(a, fn, seen) for a in node.args)
            if isinstance(f, ast.Attribute) and f.attr in _SAFE_METHODS:
                return t(f.value, fn, seen) and all(t(a, fn, seen) for a in node.args) and all(
                    t(k.value, fn, seen) for k in node.keywords)
            return False
        if isinstance(node, ast.Name):
            if node.id in seen:
                return True
            if fn is not None:
                if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef) and node.id in _params(fn):
                    return False
                binds = self._bindings(fn, node.id)
                if binds:
                    guard = seen | {node.id}
                    return all(t(v, fn, guard) for _, v in binds)
            value = self.constants.get(node.id)
            if value is not None and node.id not in seen:
                return t(value, None, seen | {node.id})
            return False
        return False

    # ------------------------------------------------------------------ report
    def findings(self) -> list[str]:
        self._discover_sinks()
        out = []
        for m in self.modules.values():
            text = None
            owner: dict[int, ast.AST] = {}
            for fn in _functions(m.tree):
                for node in _own_nodes(fn):
                    owner[id(node)] = fn
            for node in ast.walk(m.tree):
                if not isinstance(node, ast.Call):
                    continue
                for arg in self._sql_args(node):
                    self.calls += 1
                    fn = owner.get(id(node))
                    if self.trusted(arg, fn):
                        continue
                    if (isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef)
                            and fn.name in self.sinks and self._origin(arg, fn) is not None):
                        continue  # the helper's SQL parameter, passed on: its callers are checked
                    if text is None:
                        text = m.path.read_text() if m.path.exists() else ""
                    seg = ast.get_source_segment(text, arg) if text else None
                    out.append(f"{_rel(m.path)}:{node.lineno}: SQL built from untrusted values: "
                               f"{(seg or ast.unparse(arg))[:120]}")
        return out


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def check_sql() -> Row:
    row = Row("SQL parameterised everywhere in src/ (AST taint scan)", "no untrusted SQL text")
    probe = SqlChecker({Path("<hostile snippet>"): HOSTILE_SNIPPET})
    found = probe.findings()
    row.check(len(found) == HOSTILE_FINDINGS,
              f"self-test: the checker found {len(found)} of {HOSTILE_FINDINGS} injections in the "
              f"hostile snippet: {found}")
    checker = SqlChecker({p: p.read_text() for p in sorted(SRC.rglob("*.py"))})
    bad = checker.findings()
    row.problems.extend(bad)
    row.check(checker.calls >= 30, f"only {checker.calls} SQL calls found in src/: checker broken?")
    return row


# ---------------------------------------------------------------------------- systemd
def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: repeated keys accumulate, ``#``/``;`` comments, continuation."""
    out: dict[str, dict[str, list[str]]] = {}
    section = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        if section is not None:
            out[section].setdefault(key.strip(), []).append(value.strip())
    return out


def _documented_dirs() -> dict[str, str]:
    """The directories the daemon writes (defaults from the settings and the env file)."""
    from dsa110_contimg.config import PathsConfig
    from dsa110_contimg.configbase import describe_slice

    dirs = {env: default for env, default, _ in describe_slice(PathsConfig)}
    if ENV_FILE.exists():  # an edited env file documents the site's paths
        for line in ENV_FILE.read_text().splitlines():
            line = line.lstrip("#").strip()
            k, sep, v = line.partition("=")
            if sep and k in dirs and v:
                dirs[k] = v
    return dirs


def check_unit() -> Row:
    row = Row("systemd unit: unprivileged user, read-only view", "User≠root, strict, RW=documented dirs")
    unit = parse_unit(UNIT.read_text())
    svc = unit.get("Service", {})

    def one(key: str) -> str | None:
        vals = svc.get(key) or []
        return vals[-1] if vals else None

    user, group = one("User"), one("Group")
    row.check(user and user not in ("root", "0"),
              f"User={user!r}: must be an unprivileged account")
    row.check(group is None or group not in ("root", "0"), f"Group={group!r}")
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"),
                      ("PrivateTmp", "yes"), ("RestrictSUIDSGID", "yes")):
        row.check(one(key) == want, f"{key}={one(key)!r}, expected {want}")
    row.check(one("ProtectHome") in ("yes", "read-only", "tmpfs"),
              f"ProtectHome={one('ProtectHome')!r}")
    row.check(one("CapabilityBoundingSet") == "" and one("AmbientCapabilities") in ("", None),
              "the unit keeps capabilities")
    dirs = _documented_dirs()
    writable = {"CONTIMG_OUTPUT_DIR", "CONTIMG_SCRATCH_DIR", "CONTIMG_STATE_DIR", "CONTIMG_TMPFS_PATH"}
    allowed = {dirs[k].rstrip("/") for k in writable}
    rw = [p.lstrip("-").rstrip("/") for v in svc.get("ReadWritePaths", []) for p in v.split()]
    row.check(rw, "no ReadWritePaths: the daemon could not write its products")
    extra = sorted(set(rw) - allowed)
    row.check(not extra, f"ReadWritePaths beyond the documented directories: {extra}")
    missing = sorted(allowed - set(rw))
    row.check(not missing, f"documented directories not writable under the unit: {missing}")
    ro = [p.lstrip("-").rstrip("/") for v in svc.get("ReadOnlyPaths", []) for p in v.split()]
    inp = dirs["CONTIMG_INPUT_DIR"].rstrip("/")
    row.check(inp in ro and inp not in rw, f"input dir {inp} must be read-only (RO={ro})")
    exec_start = one("ExecStart") or ""
    row.check("sudo" not in exec_start and not exec_start.startswith("+"),
              f"ExecStart escapes the sandbox: {exec_start!r}")
    from dsa110_contimg.config import ApiOptions

    row.check(ApiOptions().host == "127.0.0.1", f"default API host is {ApiOptions().host!r}")
    return row


def session_static(workdir: Path) -> list[Row]:
    rows = []
    for fn in (check_sql, check_unit):
        try:
            rows.append(fn())
        except Exception as exc:  # noqa: BLE001
            r = Row(fn.__name__, "-")
            r.problems.append(f"{type(exc).__name__}: {exc}")
            rows.append(r)
    return rows
