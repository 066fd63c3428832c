#!/usr/bin/env python3
"""The lab's `terraform`: the Terraform CLI the RKE2 runbooks call, for the Proxmox env
(runbooks/infra/terraform/envs/lab and copies of it) with the bpg/proxmox provider, against the
lab's Proxmox VE API stand-in. Terraform cannot run here (no binary, no download), so the lab
stands in for it following its documented behaviour: the real HCL parsed with python-hcl2,
variables resolved as Terraform does (defaults, TF_VAR_*, terraform.tfvars, *.auto.tfvars, -var),
the module's for_each/count expanded, state refreshed against the API (a VM gone from the
hypervisor is planned for creation again, as the provider does), the local backend's
terraform.tfstate (format 4) and .terraform/ in the -chdir directory.

Commands: version, init, plan, show, apply, output, state list, import. Only the expressions
and functions these files use are evaluated; anything else fails loudly, naming file and line.
No other provider, no remote backend, no provisioners (docs/rke2/lab.md).
"""

import glob
import json
import os
import re
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

try:
    import hcl2.api
    from lark import Token, Tree
except ImportError:
    sys.stderr.write("terraform (the lab's stand-in): python-hcl2 is missing: "
                     "python3 -m pip install 'python-hcl2>=8,<9' (scripts/test installs it)\n")
    sys.exit(1)

VERSION = "1.9.8"
PROVIDER_SOURCE = "registry.terraform.io/bpg/proxmox"
PROVIDER = f'provider["{PROVIDER_SOURCE}"]'
VM = "proxmox_virtual_environment_vm"


class TfError(Exception):
    def __init__(self, summary, detail="", where=None):
        super().__init__(summary)
        self.summary, self.detail, self.where = summary, detail, where


def diag(kind, summary, detail="", where=None):
    lines = [f"{kind}: {summary}", ""]
    if where:
        lines += [f"  on {where}:", ""]
    if detail:
        lines.append(detail)
    sys.stderr.write("╷\n" + "".join(f"│ {x}\n" for x in lines) + "╵\n")


class Unknown:
    """A value known only after apply."""

    def __repr__(self):
        return "(known after apply)"


UNKNOWN = Unknown()


# ----------------------------------------------------------------------------- HCL tree


def kids(t):
    return [c for c in t.children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def first_token(t):
    if isinstance(t, Token):
        return t
    for c in t.children:
        tok = first_token(c)
        if tok is not None:
            return tok
    return None


class Src:
    def __init__(self, path, root):
        self.path, self.root = path, root

    def where(self, t):
        tok = first_token(t)
        rel = os.path.relpath(self.path, self.root)
        return f"{rel} line {tok.line}" if tok is not None and tok.line else rel


def parse_file(path, root):
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise TfError("Failed to read file", f"The file {path!r} could not be read: {e.strerror}.")
    try:
        tree = hcl2.api.parses_to_tree(text if text.endswith("\n") else text + "\n")
    except Exception as e:  # lark's errors carry line and column
        raise TfError("Invalid HCL syntax", str(e).strip().splitlines()[0],
                      f"{os.path.relpath(path, root)} line {getattr(e, 'line', '?')}")
    return tree, Src(path, root)


def name_of(t):
    """An identifier, keyword or string used as a name (block type, label, attribute)."""
    if isinstance(t, Token):
        return str(t)
    if t.data in ("identifier", "keyword", "literal_value"):
        return str(t.children[0])
    if t.data == "string":
        return "".join(str(p.children[0]) for p in kids(t))
    if t.data == "expr_term" and len(kids(t)) == 1:
        return name_of(kids(t)[0])
    raise TfError("Invalid name", f"expected a name, found {t.data}")


class Body:
    """A body's attributes (name -> expression tree) and blocks (type, labels, Body)."""

    def __init__(self, tree, src):
        self.src, self.attrs, self.blocks, self.tree = src, {}, [], tree
        for c in kids(tree):
            if c.data == "attribute":
                k = kids(c)
                self.attrs[name_of(k[0])] = k[-1]
            elif c.data == "block":
                k = kids(c)
                self.blocks.append((name_of(k[0]), [name_of(x) for x in k[1:-1]], Body(k[-1], src), c))

    def where(self, t=None):
        return self.src.where(t if t is not None else self.tree)


# ---------------------------------------------------------------------------- evaluation


def tostr(v, src=None, t=None):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(int(v)) if float(v).is_integer() else repr(v)
    if isinstance(v, str):
        return v
    raise TfError("Invalid template interpolation value", f"Cannot include a {type(v).__name__} value in a string.",
                  src.where(t) if src else None)


def tonum(v):
    if isinstance(v, bool):
        raise ValueError("a number is required")
    if isinstance(v, (int, float)):
        return v
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            raise ValueError(f"a number is required, got {v!r}")
        return int(f) if f.is_integer() else f
    raise ValueError("a number is required")


def unescape(s):
    return re.sub(r'\\(["\\ntr])', lambda m: {"n": "\n", "t": "\t", "r": "\r"}.get(m.group(1), m.group(1)), s)


class Scope:
    """Root names (var, local, module, each, count, path, resource types) and for-loop names."""

    def __init__(self, names, parent=None):
        self.names, self.parent = names, parent

    def get(self, k):
        s = self
        while s is not None:
            if k in s.names:
                return s.names[k]
            s = s.parent
        raise KeyError(k)


class Lazy(dict):
    """A map whose values are computed on first use (locals, module outputs)."""

    def __init__(self, compute, keys, what):
        super().__init__()
        self.compute, self.pending, self.busy, self.what = compute, set(keys), set(), what

    def __contains__(self, k):
        return k in self.pending or dict.__contains__(self, k)

    def __getitem__(self, k):
        if dict.__contains__(self, k):
            return dict.__getitem__(self, k)
        if k not in self.pending:
            raise KeyError(k)
        if k in self.busy:
            raise TfError("Cycle in references", f"{self.what}.{k} refers to itself.")
        self.busy.add(k)
        v = self.compute(k)
        self.busy.discard(k)
        self.pending.discard(k)
        dict.__setitem__(self, k, v)
        return v


def ev(t, scope, src):
    d = t.data
    k = kids(t)
    if d == "expr_term":
        if t.children and isinstance(t.children[0], Token) and t.children[0].type == "LPAR":
            return ev(k[0], scope, src)
        return ev(k[0], scope, src)
    if d == "int_lit":
        return int(str(t.children[0]))
    if d == "float_lit":
        return float(str(t.children[0]))
    if d == "literal_value":
        return {"true": True, "false": False, "null": None}[str(t.children[0])]
    if d == "string":
        parts = k
        if len(parts) == 1 and kids(parts[0]) and kids(parts[0])[0].data == "interpolation":
            return ev(kids(kids(parts[0])[0])[0], scope, src)
        out = []
        for p in parts:
            c = p.children[0]
            if isinstance(c, Token):
                out.append("${" + str(c)[3:] if c.type == "ESCAPED_INTERPOLATION" else unescape(str(c)))
            elif c.data == "interpolation":
                v = ev(kids(c)[0], scope, src)
                if v is UNKNOWN:
                    return UNKNOWN
                out.append(tostr(v, src, c))
            else:
                raise TfError("Unsupported expression", "template directives (%{…}) are not evaluated by the lab's "
                              "Terraform stand-in", src.where(c))
        return "".join(out)
    if d in ("heredoc_template", "heredoc_template_trim"):
        raw = str(t.children[0])
        body = raw.split("\n", 1)[1].rsplit("\n", 2)[0] + "\n"
        return body
    if d == "identifier":
        n = str(t.children[0])
        try:
            return scope.get(n)
        except KeyError:
            raise TfError("Reference to undeclared name", f"There is no {n!r} in this scope.", src.where(t))
    if d == "tuple":
        return [ev(x, scope, src) for x in k]
    if d == "object":
        out = {}
        for el in k:
            ek = kids(el)
            key_t = kids(ek[0])[0] if kids(ek[0]) else ek[0]
            if key_t.data == "expr_term" and len(kids(key_t)) == 1 and kids(key_t)[0].data == "identifier" \
                    and not (key_t.children and isinstance(key_t.children[0], Token)):
                key = str(kids(key_t)[0].children[0])
            elif key_t.data == "keyword":
                key = str(key_t.children[0])
            else:
                key = tostr(ev(key_t, scope, src), src, key_t)
            out[key] = ev(ek[-1], scope, src)
        return out
    if d == "get_attr_expr_term":
        base = ev(k[0], scope, src)
        attr = name_of(kids(k[1])[0])
        return get_attr(base, attr, src, t)
    if d == "index_expr_term":
        base = ev(k[0], scope, src)
        ix = k[1]
        key = int(str(ix.children[-1])) if ix.data == "short_index" else ev(kids(ix)[0], scope, src)
        return index(base, key, src, t)
    if d == "function_call":
        fname = name_of(k[0])
        args_t = kids(k[1]) if len(k) > 1 else []
        expand = len(k) > 1 and any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in k[1].children)
        return call(fname, args_t, expand, scope, src, t)
    if d == "conditional":
        c = ev(k[0], scope, src)
        if c is UNKNOWN:
            return UNKNOWN
        if not isinstance(c, bool):
            raise TfError("Incorrect condition type", "The condition expression must be of type bool.", src.where(t))
        return ev(k[1] if c else k[2], scope, src)
    if d == "binary_op":
        left = ev(k[0], scope, src)
        term = k[1]
        op = str(kids(term)[0].children[0])
        right = ev(kids(term)[1], scope, src)
        return binop(op, left, right, src, t)
    if d == "unary_op":
        op = str(t.children[0])
        v = ev(k[0], scope, src)
        if v is UNKNOWN:
            return UNKNOWN
        if op == "!":
            if not isinstance(v, bool):
                raise TfError("Invalid operand", "a bool is required for !", src.where(t))
            return not v
        return -tonum(v)
    if d in ("for_tuple_expr", "for_object_expr"):
        return for_expr(t, scope, src)
    raise TfError("Unsupported expression",
                  f"the lab's Terraform stand-in does not evaluate `{d}` expressions (only what the runbooks' "
                  "Terraform files use)", src.where(t))


def get_attr(base, attr, src, t):
    if base is UNKNOWN:
        return UNKNOWN
    if isinstance(base, dict):
        try:
            return base[attr]
        except KeyError:
            raise TfError("Unsupported attribute", f"This object does not have an attribute named {attr!r}.",
                          src.where(t))
    raise TfError("Unsupported attribute", f"Can't access attributes on a {type(base).__name__} value.", src.where(t))


def index(base, key, src, t):
    if base is UNKNOWN or key is UNKNOWN:
        return UNKNOWN
    try:
        if isinstance(base, list):
            return base[int(tonum(key))] if 0 <= int(tonum(key)) < len(base) else base[len(base) + 1]
        if isinstance(base, dict):
            return base[tostr(key)]
    except (IndexError, KeyError, ValueError):
        raise TfError("Invalid index", f"The given key {key!r} does not identify an element in this collection value.",
                      src.where(t))
    raise TfError("Invalid index", f"This value ({type(base).__name__}) does not have any indices.", src.where(t))


def binop(op, a, b, src, t):
    if a is UNKNOWN or b is UNKNOWN:
        return UNKNOWN
    try:
        if op in ("&&", "||"):
            if not isinstance(a, bool) or not isinstance(b, bool):
                raise ValueError("a bool is required")
            return (a and b) if op == "&&" else (a or b)
        if op == "==":
            return a == b
        if op == "!=":
            return a != b
        x, y = tonum(a), tonum(b)
        r = {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y, "/": lambda: x / y, "%": lambda: x % y,
             "<": lambda: x < y, ">": lambda: x > y, "<=": lambda: x <= y, ">=": lambda: x >= y}[op]()
        return int(r) if isinstance(r, float) and r.is_integer() and op != "/" else r
    except (ValueError, ZeroDivisionError) as e:
        raise TfError("Invalid operand", f"Unsuitable value for operator {op}: {e}.", src.where(t))


def for_expr(t, scope, src):
    k = kids(t)
    intro = kids(k[0])
    names = [str(x.children[0]) for x in intro if x.data == "identifier"]
    coll = ev(intro[-1], scope, src)
    cond = k[-1] if k[-1].data == "for_cond" else None
    body = k[1:-1] if cond else k[1:]
    group = any(isinstance(c, Token) and c.type == "ELLIPSIS" for c in t.children)
    if coll is UNKNOWN:
        return UNKNOWN
    if isinstance(coll, dict):
        pairs = sorted(coll.items())
    elif isinstance(coll, list):
        pairs = list(enumerate(coll))
    else:
        raise TfError("Iteration over non-iterable value", "A value of type "
                      f"{type(coll).__name__} cannot be used as the collection in a 'for' expression.", src.where(t))
    out_list, out_map = [], {}
    for key, val in pairs:
        inner = Scope(dict(zip(names, [key, val]) if len(names) == 2 else {names[0]: val}), scope)
        if cond is not None:
            c = ev(kids(cond)[0], inner, src)
            if not isinstance(c, bool):
                raise TfError("Invalid 'for' condition", "The 'if' clause value is not a bool.", src.where(cond))
            if not c:
                continue
        if t.data == "for_tuple_expr":
            out_list.append(ev(body[0], inner, src))
        else:
            kk = tostr(ev(body[0], inner, src), src, body[0])
            vv = ev(body[1], inner, src)
            if group:
                out_map.setdefault(kk, []).append(vv)
            elif kk in out_map:
                raise TfError("Duplicate object key", f"Two different items produced the key {kk!r} in this 'for' "
                              "expression. If duplicates are expected, use the ellipsis (...) after the value "
                              "expression to enable grouping by key.", src.where(t))
            else:
                out_map[kk] = vv
    return out_list if t.data == "for_tuple_expr" else out_map


def distinct(xs):
    out = []
    for x in xs:
        if x not in out:
            out.append(x)
    return out


FUNCS = {
    "range": lambda *a: list(range(*[int(tonum(x)) for x in a])),
    "length": lambda x: len(x),
    "split": lambda sep, s: s.split(sep),
    "join": lambda sep, xs: sep.join(tostr(x) for x in xs),
    "concat": lambda *ls: [x for lst in ls for x in lst],
    "values": lambda m: [m[k] for k in sorted(m)],
    "keys": lambda m: sorted(m),
    "distinct": distinct,
    "sort": lambda xs: sorted(tostr(x) for x in xs),
    "tostring": lambda x: None if x is None else tostr(x),
    "tonumber": lambda x: None if x is None else tonum(x),
    "min": lambda *a: min(tonum(x) for x in a),
    "max": lambda *a: max(tonum(x) for x in a),
    "contains": lambda xs, v: v in xs,
    "lookup": lambda m, k, *d: m[k] if k in m else (d[0] if d else (_ for _ in ()).throw(KeyError(k))),
    "merge": lambda *ms: {k: v for m in ms for k, v in m.items()},
    "lower": lambda s: s.lower(),
    "upper": lambda s: s.upper(),
    "format": lambda f, *a: re.sub(r"%[sd]", lambda m, it=iter(a): tostr(next(it)), f),
}


def regex_fn(pattern, s):
    m = re.search(pattern, s)
    if not m:
        raise ValueError("pattern did not match any part of the given string")
    if m.groupdict():
        return m.groupdict()
    return list(m.groups()) if m.groups() else m.group(0)


FUNCS["regex"] = regex_fn


def call(fname, args_t, expand, scope, src, t):
    if fname in ("can", "try"):
        for a in args_t:
            try:
                v = ev(a, scope, src)
                return True if fname == "can" else v
            except TfError as e:
                if e.summary == "Unsupported expression":
                    raise
        if fname == "can":
            return False
        raise TfError("Error in function call", "try(): no expression succeeded", src.where(t))
    if fname not in FUNCS:
        raise TfError("Call to unsupported function", f"The lab's Terraform stand-in does not implement {fname}(): "
                      "only the functions the runbooks' Terraform files use.", src.where(t))
    args = [ev(a, scope, src) for a in args_t]
    if expand and args:
        args = args[:-1] + list(args[-1])
    if any(a is UNKNOWN for a in args):
        return UNKNOWN
    try:
        return FUNCS[fname](*args)
    except (ValueError, TypeError, KeyError, AttributeError, re.error) as e:
        raise TfError("Error in function call", f"Call to function {fname!r} failed: {e}.", src.where(t))


# ------------------------------------------------------------------------------- types


def type_of(t, src):
    """A type constraint tree -> ('string') | ('list', T) | ('object', {k: (T, optional, default)})."""
    k = kids(t)
    if t.data == "expr_term" and len(k) == 1:
        return type_of(k[0], src)
    if t.data == "identifier":
        n = str(t.children[0])
        if n in ("string", "number", "bool", "any"):
            return (n,)
    if t.data == "function_call":
        f = name_of(k[0])
        args = kids(k[1]) if len(k) > 1 else []
        if f in ("list", "set", "map") and len(args) == 1:
            return (f, type_of(args[0], src))
        if f == "object" and len(args) == 1:
            obj = kids(args[0])[0] if args[0].data == "expr_term" else args[0]
            attrs = {}
            for el in kids(obj):
                ek = kids(el)
                key = name_of(kids(ek[0])[0] if kids(ek[0]) else ek[0])
                vt = kids(ek[-1])[0] if ek[-1].data == "expr_term" and len(kids(ek[-1])) == 1 else ek[-1]
                if vt.data == "function_call" and name_of(kids(vt)[0]) == "optional":
                    oa = kids(kids(vt)[1])
                    attrs[key] = (type_of(oa[0], src), True, ev(oa[1], Scope({}), src) if len(oa) > 1 else None)
                else:
                    attrs[key] = (type_of(ek[-1], src), False, None)
            return ("object", attrs)
    raise TfError("Invalid type specification", "the lab's Terraform stand-in understands string, number, bool, any, "
                  "list(), set(), map() and object() with optional()", src.where(t))


def convert(v, ty, what):
    kind = ty[0]
    if v is None or v is UNKNOWN or kind == "any":
        return v
    try:
        if kind == "string":
            if isinstance(v, (list, dict)):
                raise ValueError("string required")
            return tostr(v)
        if kind == "number":
            return tonum(v)
        if kind == "bool":
            if isinstance(v, bool):
                return v
            if v in ("true", "false"):
                return v == "true"
            raise ValueError("bool required")
        if kind in ("list", "set"):
            if not isinstance(v, list):
                raise ValueError(f"{kind} of {ty[1][0]} required")
            out = [convert(x, ty[1], what) for x in v]
            return sorted(distinct(out), key=json.dumps) if kind == "set" else out
        if kind == "map":
            if not isinstance(v, dict):
                raise ValueError("map required")
            return {k: convert(x, ty[1], what) for k, x in v.items()}
        if kind == "object":
            if not isinstance(v, dict):
                raise ValueError("object required")
            out = {}
            for k, (at, opt, default) in ty[1].items():
                if k in v and v[k] is not None:
                    out[k] = convert(v[k], at, f"{what}.{k}")
                elif opt:
                    out[k] = convert(default, at, f"{what}.{k}")
                else:
                    raise ValueError(f"attribute {k!r} is required")
            return out
    except (ValueError, TfError) as e:
        raise TfError("Invalid value for input variable", f"The given value is not suitable for {what}: "
                      f"{getattr(e, 'summary', None) or e}.")
    return v


# ---------------------------------------------------------------------------- modules


class Module:
    """One directory's configuration."""

    def __init__(self, path, root, addr=""):
        self.path, self.addr = path, addr
        self.variables, self.locals, self.calls, self.resources, self.outputs = {}, {}, {}, [], {}
        self.providers, self.checks, self.required, self.imports = [], [], {}, []
        files = sorted(glob.glob(os.path.join(path, "*.tf")))
        if not files:
            raise TfError("No configuration files", f"There are no .tf files in {os.path.relpath(path, root)}.")
        for f in files:
            tree, src = parse_file(f, root)
            body = Body(kids(tree)[0], src)
            for typ, labels, b, node in body.blocks:
                if typ == "variable":
                    self.variables[labels[0]] = b
                elif typ == "locals":
                    for k, v in b.attrs.items():
                        self.locals[k] = (v, src)
                elif typ == "module":
                    self.calls[labels[0]] = b
                elif typ == "resource":
                    self.resources.append((labels[0], labels[1], b))
                elif typ == "data":
                    raise TfError("Unsupported block", "data sources are not implemented by the lab's Terraform "
                                  "stand-in", src.where(node))
                elif typ == "output":
                    self.outputs[labels[0]] = b
                elif typ == "provider":
                    self.providers.append((labels[0], b))
                elif typ == "check":
                    self.checks.append((labels[0], b))
                elif typ == "import":
                    self.imports.append(b)
                elif typ == "terraform":
                    for t2, _, b2, _ in b.blocks:
                        if t2 == "required_providers":
                            for pname, pexpr in b2.attrs.items():
                                spec = ev(pexpr, Scope({}), src)
                                self.required[pname] = spec.get("source", "") if isinstance(spec, dict) else ""
                        elif t2 == "backend":
                            raise TfError("Unsupported backend", "the lab's Terraform stand-in keeps state with the "
                                          "local backend only", src.where(node))
        for pname, source in self.required.items():
            full = source if source.count("/") == 2 else f"registry.terraform.io/{source}"
            if full.lower() != PROVIDER_SOURCE:
                raise TfError("Provider not available",
                              f"This configuration requires provider {source!r}; the lab's Terraform stand-in "
                              "implements only bpg/proxmox (the lab's Proxmox VE API stand-in). The vSphere env "
                              "cannot run here.")
        for typ, _, b in self.resources:
            if typ != VM:
                raise TfError("Unsupported resource type", f"The lab's Terraform stand-in implements only {VM}, "
                              f"not {typ}.", b.where())


class Evaluated:
    """A module instance evaluated with its inputs: locals, resources' instances (planned
    values, where state supplies what only apply knows) and outputs."""

    def __init__(self, mod, root, inputs, state_by_addr, planned_ids=None):
        self.mod, self.root, self.state, self.planned_ids = mod, root, state_by_addr, planned_ids or {}
        self.var = inputs
        self.local = Lazy(self.local_value, mod.locals.keys(), "local")
        self.children = {}
        self.module = Lazy(self.child_outputs, mod.calls.keys(), "module")
        self.types = {}
        self.instances = {}  # address -> (config dict, Body)
        for typ, name, b in mod.resources:
            self.types.setdefault(typ, Lazy(lambda n, typ=typ: self.resource_value(typ, n),
                                            [n for t, n, _ in mod.resources if t == typ], typ))
        self.scope = Scope({"var": self.var, "local": self.local, "module": self.module,
                            "path": {"module": mod.path, "root": root, "cwd": os.getcwd()}, **self.types})

    def local_value(self, k):
        expr, src = self.mod.locals[k]
        return ev(expr, self.scope, src)

    def child(self, name):
        if name not in self.children:
            b = self.mod.calls[name]
            source = ev(b.attrs["source"], Scope({}), b.src)
            if not str(source).startswith(("./", "../")):
                raise TfError("Unsupported module source", f"module {name!r}: only local paths (./, ../) are "
                              f"installed by the lab's Terraform stand-in, not {source!r}.", b.where())
            child = Module(os.path.normpath(os.path.join(self.mod.path, source)), self.root,
                           f"{self.mod.addr}module.{name}.")
            inputs = {}
            for k, expr in b.attrs.items():
                if k in ("source", "version", "providers", "count", "for_each", "depends_on"):
                    continue
                if k not in child.variables:
                    raise TfError("Unsupported argument", f"An argument named {k!r} is not expected here: "
                                  f"module {name!r} declares no variable {k!r}.", b.where(expr))
                inputs[k] = ev(expr, self.scope, b.src)
            values = resolve_module_vars(child, inputs, f"module.{name}")
            self.children[name] = Evaluated(child, self.root, values, self.state, self.planned_ids)
        return self.children[name]

    def child_outputs(self, name):
        c = self.child(name)
        return {k: c.output(k) for k in c.mod.outputs}

    def output(self, k):
        b = self.mod.outputs[k]
        return ev(b.attrs["value"], self.scope, b.src)

    def expand(self, typ, name, b):
        """Instance keys with each/count scope: [(key, scope)]."""
        if "for_each" in b.attrs:
            fe = ev(b.attrs["for_each"], self.scope, b.src)
            if fe is UNKNOWN or (isinstance(fe, dict) and any(v is UNKNOWN for v in fe)):
                raise TfError("Invalid for_each argument", "The \"for_each\" map includes keys derived from resource "
                              "attributes that cannot be determined until apply.", b.where(b.attrs["for_each"]))
            if isinstance(fe, list):
                fe = {tostr(x): tostr(x) for x in fe}
            if not isinstance(fe, dict):
                raise TfError("Invalid for_each argument", "The given \"for_each\" argument value is unsuitable: "
                              "the \"for_each\" argument must be a map, or set of strings.",
                              b.where(b.attrs["for_each"]))
            return [(k, Scope({"each": {"key": k, "value": v}}, self.scope)) for k, v in sorted(fe.items())]
        if "count" in b.attrs:
            n = ev(b.attrs["count"], self.scope, b.src)
            return [(i, Scope({"count": {"index": i}}, self.scope)) for i in range(int(tonum(n)))]
        return [(None, self.scope)]

    def addr(self, typ, name, key):
        k = "" if key is None else (f'["{key}"]' if isinstance(key, str) else f"[{key}]")
        return f"{self.mod.addr}{typ}.{name}{k}"

    def resource_value(self, typ, name):
        b = [x for t, n, x in self.mod.resources if t == typ and n == name][0]
        out = {}
        for key, sc in self.expand(typ, name, b):
            cfg = self.block_config(b, sc)
            a = self.addr(typ, name, key)
            st = self.state.get(a)
            if a in self.planned_ids:
                cfg["vm_id"] = self.planned_ids[a]
            elif cfg.get("vm_id") is None:
                cfg["vm_id"] = st["attributes"]["vm_id"] if st else UNKNOWN
            cfg["id"] = tostr(cfg["vm_id"]) if cfg["vm_id"] is not UNKNOWN else UNKNOWN
            self.instances[a] = (cfg, b, key)
            out[key] = cfg
        if list(out) == [None]:
            return out[None]
        return out

    def block_config(self, b, scope):
        cfg = {}
        for k, expr in b.attrs.items():
            if k in ("for_each", "count", "depends_on", "provider"):
                continue
            cfg[k] = ev(expr, scope, b.src)
        for typ, _, sub, node in b.blocks:
            if typ == "lifecycle":
                cfg["__ignore_changes"] = sorted({str(tok) for tok in sub.attrs.get("ignore_changes", Tree("x", []))
                                                  .scan_values(lambda v: isinstance(v, Token) and v.type == "NAME")})
                continue
            if typ in ("provisioner", "connection", "dynamic"):
                raise TfError("Unsupported block", f"{typ} blocks are not implemented by the lab's Terraform "
                              "stand-in", b.where(node))
            cfg.setdefault(typ, []).append(self.block_config(sub, scope))
        return cfg

    def all_instances(self):
        for typ, name, _ in self.mod.resources:
            self.types[typ][name]
        for name in self.mod.calls:
            self.child(name).all_instances()
        out = dict(self.instances)
        for c in self.children.values():
            out.update(c.all_instances())
        return out

    def run_checks(self):
        """`check` blocks: a failed assertion is a warning, as in Terraform."""
        for name, b in self.mod.checks:
            for typ, _, sub, _ in b.blocks:
                if typ == "assert":
                    ok = ev(sub.attrs["condition"], self.scope, sub.src)
                    if ok is False:
                        diag("Warning", f"Check block assertion failed",
                             ev(sub.attrs["error_message"], self.scope, sub.src), sub.where())
        for c in self.children.values():
            c.run_checks()


def traversal(t, src):
    """The address an `import` block's `to` names (a traversal, not a value)."""
    d, k = t.data, kids(t)
    if d == "expr_term" and len(k) == 1:
        return traversal(k[0], src)
    if d == "identifier":
        return str(t.children[0])
    if d == "get_attr_expr_term":
        return traversal(k[0], src) + "." + name_of(kids(k[1])[0])
    if d == "index_expr_term":
        key = ev(kids(k[1])[0], Scope({}), src)
        return traversal(k[0], src) + (f'["{key}"]' if isinstance(key, str) else f"[{key}]")
    raise TfError("Invalid import address", "`to` must be a resource instance address.", src.where(t))


def resolve_module_vars(mod, given, what):
    """Inputs of a module: given values (or defaults) converted to their types, validations run."""
    out = {}
    for k, b in mod.variables.items():
        ty = type_of(b.attrs["type"], b.src) if "type" in b.attrs else ("any",)
        if k in given:
            v = given[k]
        elif "default" in b.attrs:
            v = ev(b.attrs["default"], Scope({}), b.src)
        else:
            raise TfError("Missing required argument", f"The argument {k!r} is required, but no definition was "
                          "found.", b.where())
        out[k] = convert(v, ty, f"{what} variable {k!r}")
    validate(mod, out)
    return out


def validate(mod, values):
    for k, b in mod.variables.items():
        for typ, _, sub, _ in b.blocks:
            if typ != "validation":
                continue
            ok = ev(sub.attrs["condition"], Scope({"var": {k: values[k]}}), sub.src)
            if ok is False:
                raise TfError("Invalid value for variable", ev(sub.attrs["error_message"], Scope({}), sub.src)
                              + f"\n\nThis was checked by the validation rule at {sub.where()}.", b.where())


def root_vars(mod, cli_vars):
    """The root module's variables as Terraform resolves them (later wins): defaults, TF_VAR_*,
    terraform.tfvars, terraform.tfvars.json, *.auto.tfvars (lexical), then -var in order."""
    raw = {}

    def from_string(k, s, where):
        b = mod.variables[k]
        ty = type_of(b.attrs["type"], b.src) if "type" in b.attrs else ("any",)
        if ty[0] in ("string", "number", "bool", "any"):
            return s
        try:
            tree = hcl2.api.parses_to_tree(f"v = {s}\n")
        except Exception as e:
            raise TfError("Invalid value for input variable", f"The value for {where} is not a valid expression: {e}")
        return ev(kids(kids(kids(tree)[0])[0])[-1], Scope({}), Src(where, "."))

    for k, v in os.environ.items():
        if k.startswith("TF_VAR_") and k[7:] in mod.variables:
            raw[k[7:]] = from_string(k[7:], v, f"environment variable {k}")
    files = [os.path.join(mod.path, "terraform.tfvars")] + sorted(glob.glob(os.path.join(mod.path, "*.auto.tfvars")))
    for f in files:
        if not os.path.exists(f):
            continue
        tree, src = parse_file(f, mod.path)
        body = Body(kids(tree)[0], src)
        for k, expr in body.attrs.items():
            if k not in mod.variables:
                diag("Warning", "Value for undeclared variable", f"The root module does not declare a variable named "
                     f"{k!r} but a value was found in file {os.path.basename(f)!r}. If you meant to use this value, "
                     "add a \"variable\" block to the configuration.", src.where(expr))
                continue
            raw[k] = ev(expr, Scope({}), src)
    for k, v in cli_vars:
        if k not in mod.variables:
            raise TfError("Value for undeclared variable", f"A variable named \"{k}\" was assigned on the command "
                          "line, but the root module does not declare a variable of that name. To use this value, "
                          "add a \"variable\" block to the configuration.")
        raw[k] = from_string(k, v, f"-var {k}")
    out = {}
    for k, b in mod.variables.items():
        ty = type_of(b.attrs["type"], b.src) if "type" in b.attrs else ("any",)
        if k in raw:
            v = raw[k]
        elif "default" in b.attrs:
            v = ev(b.attrs["default"], Scope({}), b.src)
        else:
            raise TfError("No value for required variable", f"The root module input variable \"{k}\" is not set, and "
                          "has no default value. Use a -var or -var-file command line argument to provide a value "
                          "for this variable.", b.where())
        out[k] = convert(v, ty, f"var.{k}")
    validate(mod, out)
    return out


# ------------------------------------------------------------------------------- Proxmox


class Pve:
    """The bpg/proxmox provider's calls: API token from PROXMOX_VE_API_TOKEN (or the provider
    block), TLS verified against the system's trust (SSL_CERT_FILE, as Go reads it)."""

    def __init__(self, provider_cfg):
        endpoint = os.environ.get("PROXMOX_VE_ENDPOINT") or provider_cfg.get("endpoint") or ""
        token = os.environ.get("PROXMOX_VE_API_TOKEN") or provider_cfg.get("api_token") or ""
        if not endpoint:
            raise TfError("Missing Proxmox VE endpoint", "Set the provider's endpoint or PROXMOX_VE_ENDPOINT.")
        if not token:
            raise TfError("Missing Proxmox VE API token", "Set PROXMOX_VE_API_TOKEN=user@realm!id=secret.")
        self.base = endpoint.rstrip("/") + "/api2/json"
        self.token = token
        insecure = provider_cfg.get("insecure") is True or os.environ.get("PROXMOX_VE_INSECURE") == "true"
        self.ctx = ssl.create_default_context()
        if insecure:
            self.ctx.check_hostname = False
            self.ctx.verify_mode = ssl.CERT_NONE

    def call(self, method, path, params=None, missing_ok=False):
        data = urllib.parse.urlencode(params or {}).encode() if method in ("POST", "PUT") else None
        url = self.base + path + ("?" + urllib.parse.urlencode(params) if params and method in ("GET", "DELETE")
                                  else "")
        req = urllib.request.Request(url, data=data, method=method,
                                     headers={"Authorization": f"PVEAPIToken={self.token}"})
        if data is not None:
            req.add_header("Content-Type", "application/x-www-form-urlencoded")
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as r:
                return json.loads(r.read() or b"{}").get("data")
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            try:
                msg = json.loads(body).get("message") or e.reason
            except ValueError:
                msg = e.reason
            if missing_ok and "does not exist" in str(msg):
                return None
            raise TfError(f"error {method} {path}", f"received an HTTP {e.code} response - Reason: {msg}")
        except (urllib.error.URLError, OSError) as e:
            raise TfError("error connecting to the Proxmox VE API", f"{self.base}: {getattr(e, 'reason', e)}")

    def wait(self, node, upid, what):
        end = time.time() + 600
        while time.time() < end:
            st = self.call("GET", f"/nodes/{node}/tasks/{urllib.parse.quote(upid, safe='')}/status")
            if st and st.get("status") == "stopped":
                if st.get("exitstatus") != "OK":
                    raise TfError(f"error waiting for {what}", f"task {upid} failed - {st.get('exitstatus')}")
                return
            time.sleep(0.3)
        raise TfError(f"error waiting for {what}", f"task {upid} did not finish within 600s")


def blk(cfg, *path):
    """A nested block's attribute (blocks are lists of one map)."""
    v = cfg
    for p in path:
        if isinstance(v, list):
            v = v[0] if v else {}
        v = (v or {}).get(p)
    if isinstance(v, list) and v and isinstance(v[0], dict):
        v = v[0]
    return v


def comparable(a):
    """The attributes this stand-in reads back from the hypervisor and plans changes for."""
    return {"name": a.get("name"), "node_name": a.get("node_name"), "cores": blk(a, "cpu", "cores"),
            "memory": blk(a, "memory", "dedicated"), "address": blk(a, "initialization", "ip_config", "ipv4", "address"),
            "gateway": blk(a, "initialization", "ip_config", "ipv4", "gateway"), "started": a.get("started", True)}


def vm_params(a):
    ip = blk(a, "initialization", "ip_config", "ipv4", "address")
    gw = blk(a, "initialization", "ip_config", "ipv4", "gateway")
    p = {"name": a["name"], "cores": blk(a, "cpu", "cores") or 1, "memory": blk(a, "memory", "dedicated") or 512,
         "onboot": 1 if a.get("on_boot", True) else 0, "agent": 1 if blk(a, "agent", "enabled") else 0}
    if ip:
        p["ipconfig0"] = f"ip={ip}" + (f",gw={gw}" if gw else "")
    if a.get("tags"):
        p["tags"] = ";".join(a["tags"])
    if a.get("description"):
        p["description"] = a["description"]
    user = blk(a, "initialization", "user_account", "username")
    keys = blk(a, "initialization", "user_account", "keys")
    if user:
        p["ciuser"] = user
    if keys:
        p["sshkeys"] = urllib.parse.quote("\n".join(keys), safe="")
    dns = blk(a, "initialization", "dns", "servers")
    if dns:
        p["nameserver"] = " ".join(dns)
    return p


def read_vm(pve, attrs):
    """Refresh: the VM as the hypervisor has it now, or None when it is gone."""
    vmid, node = attrs["vm_id"], attrs["node_name"]
    cfg = pve.call("GET", f"/nodes/{node}/qemu/{vmid}/config", missing_ok=True)
    if cfg is None:
        # Migrated elsewhere, or gone: the cluster's list says which.
        here = [r for r in pve.call("GET", "/cluster/resources", {"type": "vm"}) or []
                if int(r.get("vmid", -1)) == int(vmid)]
        if not here:
            return None
        node = here[0]["node"]
        cfg = pve.call("GET", f"/nodes/{node}/qemu/{vmid}/config")
    st = pve.call("GET", f"/nodes/{node}/qemu/{vmid}/status/current") or {}
    a = json.loads(json.dumps(attrs))
    a["node_name"], a["name"] = node, cfg.get("name", a.get("name"))
    a["started"] = st.get("status") == "running"
    if "cores" in cfg:
        a.setdefault("cpu", [{}])[0]["cores"] = int(cfg["cores"])
    if "memory" in cfg:
        a.setdefault("memory", [{}])[0]["dedicated"] = int(cfg["memory"])
    fields = dict(f.split("=", 1) for f in str(cfg.get("ipconfig0", "")).split(",") if "=" in f)
    ipv4 = blk(a, "initialization", "ip_config", "ipv4")
    if ipv4 is not None and "ip" in fields:
        ipv4["address"] = fields["ip"]
        ipv4["gateway"] = fields.get("gw")
    return a


# ---------------------------------------------------------------------------------- state


def state_path(d):
    return os.path.join(d, "terraform.tfstate")


def load_state(d):
    try:
        with open(state_path(d)) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"version": 4, "terraform_version": VERSION, "serial": 0, "lineage": str(uuid.uuid4()),
                "outputs": {}, "resources": [], "check_results": None}


def save_state(d, st):
    st["serial"] += 1
    p = state_path(d)
    if os.path.exists(p):
        os.replace(p, p + ".backup")
    with open(p + ".tmp", "w") as f:
        json.dump(st, f, indent=2)
    os.replace(p + ".tmp", p)


def instances(st):
    """address -> instance of the state (attributes, index_key)."""
    out = {}
    for r in st["resources"]:
        for i in r["instances"]:
            k = i.get("index_key")
            key = "" if k is None else (f'["{k}"]' if isinstance(k, str) else f"[{k}]")
            mod = r.get("module", "")
            out[f"{mod + '.' if mod else ''}{r['type']}.{r['name']}{key}"] = i
    return out


def put_instance(st, addr, key, attrs):
    mod, _, rest = addr.rpartition(f"{VM}.")
    mod = mod.rstrip(".")
    name = rest.split("[")[0]
    for r in st["resources"]:
        if r.get("module", "") == mod and r["type"] == VM and r["name"] == name:
            break
    else:
        r = {"mode": "managed", "type": VM, "name": name, "provider": PROVIDER, "instances": []}
        if mod:
            r = {"module": mod, **r}
        st["resources"].append(r)
    r["instances"] = [i for i in r["instances"] if i.get("index_key") != key]
    if attrs is not None:
        inst = {"schema_version": 0, "attributes": attrs, "sensitive_attributes": []}
        if key is not None:
            inst = {"index_key": key, **inst}
        r["instances"].append(inst)
        r["instances"].sort(key=lambda i: str(i.get("index_key")))
    st["resources"] = [x for x in st["resources"] if x["instances"]]


# ----------------------------------------------------------------------------------- CLI


class Ctx:
    def __init__(self, chdir):
        self.dir = os.path.abspath(chdir)
        self.root = self.dir

    def config(self, cli_vars=()):
        mod = Module(self.dir, self.dir)
        for name, b in mod.calls.items():
            if not os.path.exists(os.path.join(self.dir, ".terraform", "modules", "modules.json")):
                raise TfError("Module not installed", "This module is not yet installed. Run \"terraform init\" to "
                              "install all modules required by this configuration.", b.where())
        if not os.path.exists(os.path.join(self.dir, ".terraform", "providers")):
            raise TfError("Inconsistent dependency lock file", "The following dependency selections recorded in the "
                          "lock file are inconsistent with the current configuration:\n  - provider "
                          f"{PROVIDER_SOURCE}: required by this configuration but no version is selected\n\n"
                          "To make the initial dependency selections that will initialize the dependency lock file, "
                          "run:\n  terraform init")
        values = root_vars(mod, cli_vars)
        return mod, values

    def provider(self, mod, values):
        ev_ = Evaluated(mod, self.dir, values, {})
        for name, b in mod.providers:
            if name == "proxmox":
                return Pve({k: ev(v, ev_.scope, b.src) for k, v in b.attrs.items()})
        return Pve({})


def render(v, ind, sign):
    pad = " " * ind
    lines = []
    for k in sorted(x for x in v if not x.startswith("__")):
        x = v[k]
        if isinstance(x, list) and x and all(isinstance(e, dict) for e in x):
            for e in x:
                lines.append(f"{pad}{sign} {k} {{")
                lines += render(e, ind + 4, sign)
                lines.append(f"{pad}  }}")
        elif x is not None:
            shown = "(known after apply)" if x is UNKNOWN else json.dumps(x)
            lines.append(f"{pad}{sign} {k} = {shown}")
    return lines


def jsonable(v):
    if v is UNKNOWN:
        return None
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items() if not k.startswith("__")}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return v


def out_type(v):
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return ["tuple", [out_type(x) for x in v]]
    if isinstance(v, dict):
        return ["object", {k: out_type(x) for k, x in v.items()}]
    return "dynamic"


def plan(ctx, cli_vars, replace, targets, refresh=True):
    mod, values = ctx.config(cli_vars)
    st = load_state(ctx.dir)
    have = instances(st)
    # Module inputs and their validations come before the provider is configured, as in Terraform.
    pre = Evaluated(mod, ctx.dir, values, {})
    for name in mod.calls:
        pre.child(name)
    pve = ctx.provider(mod, values)
    gone, imported = [], []

    def targeted(a):
        return not targets or any(a == t or a.startswith(t + "[") or a.startswith(t + ".") for t in targets)

    if refresh:
        # As Terraform: with -target only the targeted objects are read back.
        for a, inst in [(a, i) for a, i in have.items() if targeted(a)]:
            now = read_vm(pve, inst["attributes"])
            if now is None:
                gone.append(a)
                del have[a]
            else:
                inst["attributes"] = now
    # `import` blocks (Terraform 1.5): an object not in the state yet is read from the hypervisor.
    todo = [(traversal(b.attrs["to"], b.src), ev(b.attrs["id"], Scope({}), b.src), b) for b in mod.imports]
    todo = [(a, i, b) for a, i, b in todo if a not in have]
    if todo:
        pre_want = pre.all_instances()
        for a, vid, b in todo:
            if a not in pre_want:
                raise TfError("Configuration for import target does not exist", f"The configuration for the given "
                              f"import target {a} does not exist. All target instances must have an associated "
                              "configuration to be imported.", b.where())
            node, _, vmid = str(vid).partition("/")
            if not vmid.isdigit():
                raise TfError("Invalid import id", f"expected node/vmid, got {vid!r}", b.where())
            cfg, _, key = pre_want[a]
            now = read_vm(pve, dict(jsonable(cfg), vm_id=int(vmid), id=vmid, node_name=node))
            if now is None:
                raise TfError("Cannot import non-existent remote object", f"VM {vmid} does not exist on {node}.",
                              b.where())
            have[a] = {"index_key": key, "attributes": now}
            imported.append({"addr": a, "key": key, "id": vid, "attributes": now})
    ev_ = Evaluated(mod, ctx.dir, values, have)
    want = ev_.all_instances()
    ev_.run_checks()
    bad = [r for r in replace if r not in want and r not in have]
    for r in bad:
        diag("Warning", "Replace target not found", f"The -replace option refers to {r}, which does not exist in the "
             "configuration or the state.")

    actions = []
    for a in sorted(set(want) | set(have)):
        if not targeted(a):
            continue
        cfg, _, key = want.get(a, (None, None, None))
        old = have.get(a, {}).get("attributes")
        if cfg is None:
            actions.append({"addr": a, "key": have[a].get("index_key"), "action": "delete", "before": old,
                            "after": None})
        elif old is None:
            actions.append({"addr": a, "key": key, "action": "create", "before": None, "after": jsonable(cfg)})
        elif a in replace or (cfg.get("vm_id") not in (None, UNKNOWN) and int(cfg["vm_id"]) != int(old["vm_id"])):
            actions.append({"addr": a, "key": key, "action": "replace", "before": old, "after": jsonable(cfg)})
        else:
            ignore = set(cfg.get("__ignore_changes", []))
            c, o = comparable(jsonable(cfg)), comparable(old)
            diff = {k: (o[k], c[k]) for k in c if k not in ignore and c[k] != o[k]}
            if diff:
                after = dict(old)
                after.update({k: v for k, v in jsonable(cfg).items() if k not in ignore})
                after["vm_id"], after["id"] = old["vm_id"], old["id"]
                actions.append({"addr": a, "key": key, "action": "update", "before": old, "after": after,
                                "diff": diff})
    return {"format": "runbook-lab-terraform-plan", "terraform_version": VERSION, "lineage": st["lineage"],
            "serial": st["serial"], "vars": values, "targets": targets, "actions": actions, "gone": gone,
            "imports": imported,
            "dir": ctx.dir}


def show_plan(p, out=sys.stdout, warn=True):
    w = out.write
    if p["gone"]:
        w("\nNote: Objects have changed outside of Terraform\n\nTerraform detected the following changes made "
          "outside of Terraform since the last \"terraform apply\" which may have affected this plan:\n\n")
        for a in p["gone"]:
            w(f"  # {a} has been deleted\n")
        w("\nUnless you have made equivalent changes to your configuration, or ignored the relevant attributes "
          "using ignore_changes, the following plan may include actions to undo or respond to these changes.\n\n")
    for x in p.get("imports", []):
        w(f"  # {x['addr']} will be imported\n")
    if not p["actions"] and not p.get("imports"):
        w("\nNo changes. Your infrastructure matches the configuration.\n\nTerraform has compared your real "
          "infrastructure against your configuration and found no differences, so no changes are needed.\n")
        return
    w("\nTerraform used the selected providers to generate the following execution plan. Resource actions are "
      "indicated with the following symbols:\n")
    kinds = {x["action"] for x in p["actions"]}
    for k, s in (("create", "  + create"), ("update", "  ~ update in-place"), ("delete", "  - destroy"),
                 ("replace", "-/+ destroy and then create replacement")):
        if k in kinds:
            w(s + "\n")
    w("\nTerraform will perform the following actions:\n\n")
    for x in p["actions"]:
        a = x["addr"]
        head = {"create": "will be created", "update": "will be updated in-place", "delete": "will be destroyed",
                "replace": "will be replaced, as requested"}[x["action"]]
        sign = {"create": "+", "update": "~", "delete": "-", "replace": "-/+"}[x["action"]]
        w(f"  # {a} {head}\n")
        typ, name = a.split(VM + ".")[1].split("[")[0], VM
        w(f"  {sign} resource \"{name}\" \"{typ}\" {{\n")
        if x["action"] == "update":
            for k, (o, n) in x["diff"].items():
                w(f"      ~ {k} = {json.dumps(o)} -> {json.dumps(n)}\n")
        else:
            body = x["after"] if x["after"] is not None else x["before"]
            for line in render(body, 6, "-" if x["action"] == "delete" else "+"):
                w(line + "\n")
        w("    }\n\n")
    add = sum(x["action"] in ("create", "replace") for x in p["actions"])
    chg = sum(x["action"] == "update" for x in p["actions"])
    dele = sum(x["action"] in ("delete", "replace") for x in p["actions"])
    imp = f"{len(p['imports'])} to import, " if p.get("imports") else ""
    w(f"Plan: {imp}{add} to add, {chg} to change, {dele} to destroy.\n")
    if p["targets"] and warn:
        diag("Warning", "Resource targeting is in effect", "You are creating a plan with the -target option, which "
             "means that the result of this plan may not represent all of the changes requested by the current "
             "configuration.")


def apply(ctx, p):
    st = load_state(ctx.dir)
    if not os.path.exists(state_path(ctx.dir)):
        st["lineage"] = p["lineage"]  # the new state's lineage is the plan's
    if st["lineage"] != p["lineage"] or st["serial"] != p["serial"]:
        raise TfError("Saved plan is stale", "The given plan file can no longer be applied because the state was "
                      "changed by another operation after the plan was created.")
    mod = Module(ctx.dir, ctx.dir)
    pve = ctx.provider(mod, p["vars"])
    for a in p["gone"]:
        key = instances(st)[a].get("index_key") if a in instances(st) else None
        put_instance(st, a, key, None)
    counts = {"imported": 0, "added": 0, "changed": 0, "destroyed": 0}
    for x in p.get("imports", []):
        print(f"{x['addr']}: Importing... [id={x['id']}]", flush=True)
        put_instance(st, x["addr"], x["key"], x["attributes"])
        save_state(ctx.dir, st)
        counts["imported"] += 1
        print(f"{x['addr']}: Import complete [id={x['id']}]", flush=True)
    for x in p["actions"]:
        a, t0 = x["addr"], time.time()
        if x["action"] in ("delete", "replace"):
            old = x["before"]
            print(f"{a}: Destroying... [id={old['id']}]", flush=True)
            node, vmid = old["node_name"], old["vm_id"]
            cur = pve.call("GET", f"/nodes/{node}/qemu/{vmid}/status/current", missing_ok=True)
            if cur is not None:
                if cur.get("status") == "running":
                    pve.wait(node, pve.call("POST", f"/nodes/{node}/qemu/{vmid}/status/stop"), f"VM {vmid} to stop")
                pve.wait(node, pve.call("DELETE", f"/nodes/{node}/qemu/{vmid}"), f"VM {vmid} to be destroyed")
            put_instance(st, a, x["key"], None)
            save_state(ctx.dir, st)
            counts["destroyed"] += 1
            print(f"{a}: Destruction complete after {int(time.time() - t0)}s", flush=True)
        if x["action"] in ("create", "replace"):
            t0 = time.time()
            print(f"{a}: Creating...", flush=True)
            want = x["after"]
            node = want["node_name"]
            vmid = want.get("vm_id")
            if vmid is None:
                vmid = int(pve.call("GET", "/cluster/nextid"))
            src_node = blk(want, "clone", "node_name") or node
            tmpl = blk(want, "clone", "vm_id")
            if tmpl is None:
                raise TfError("Unsupported VM definition", f"{a}: only clones of a template are implemented by the "
                              "lab's Terraform stand-in (a clone block with vm_id).")
            pve.wait(src_node, pve.call("POST", f"/nodes/{src_node}/qemu/{tmpl}/clone",
                                        {"newid": vmid, "name": want["name"], "target": node,
                                         "full": 1 if blk(want, "clone", "full") else 0}), f"VM {vmid} clone")
            pve.wait(node, pve.call("POST", f"/nodes/{node}/qemu/{vmid}/config", vm_params(want)),
                     f"VM {vmid} configuration")
            attrs = dict(want, vm_id=int(vmid), id=str(vmid))
            if want.get("started", True):
                pve.wait(node, pve.call("POST", f"/nodes/{node}/qemu/{vmid}/status/start"), f"VM {vmid} to start")
            put_instance(st, a, x["key"], attrs)
            save_state(ctx.dir, st)
            counts["added"] += 1
            print(f"{a}: Creation complete after {int(time.time() - t0)}s [id={vmid}]", flush=True)
        if x["action"] == "update":
            old, want = x["before"], x["after"]
            print(f"{a}: Modifying... [id={old['id']}]", flush=True)
            node, vmid = old["node_name"], old["vm_id"]
            pve.wait(node, pve.call("POST", f"/nodes/{node}/qemu/{vmid}/config", vm_params(want)),
                     f"VM {vmid} configuration")
            if "started" in x["diff"]:
                verb = "start" if want.get("started", True) else "stop"
                pve.wait(node, pve.call("POST", f"/nodes/{node}/qemu/{vmid}/status/{verb}"), f"VM {vmid} to {verb}")
            put_instance(st, a, x["key"], want)
            save_state(ctx.dir, st)
            counts["changed"] += 1
            print(f"{a}: Modifications complete after {int(time.time() - t0)}s [id={vmid}]", flush=True)
    outputs = compute_outputs(ctx, mod, p["vars"], st)
    st["outputs"] = {k: {"value": v, "type": out_type(v)} for k, v in outputs.items()}
    save_state(ctx.dir, st)
    imp = f"{counts['imported']} imported, " if counts["imported"] else ""
    print(f"\nApply complete! Resources: {imp}{counts['added']} added, {counts['changed']} changed, "
          f"{counts['destroyed']} destroyed.")
    if outputs:
        print("\nOutputs:\n")
        for k, v in outputs.items():
            print(f"{k} = {json.dumps(v, indent=2)}")


def compute_outputs(ctx, mod, values, st):
    """Root outputs from the state; an output referring to an instance not in the state (a
    targeted apply) is left out with a warning, as the values are not known."""
    have = instances(st)
    ev_ = Evaluated(mod, ctx.dir, values, have)
    out = {}
    for k in mod.outputs:
        try:
            v = ev_.output(k)
        except TfError as e:
            diag("Warning", f"Output {k!r} not updated", f"{e.summary}: {e.detail}")
            continue
        if json.dumps(jsonable(v)).find("null") >= 0 and _has_unknown(v):
            diag("Warning", f"Output {k!r} not updated", "It refers to resources that are not in the state.")
            continue
        out[k] = jsonable(v)
    return out


def _has_unknown(v):
    if v is UNKNOWN:
        return True
    if isinstance(v, dict):
        return any(_has_unknown(x) for x in v.values())
    if isinstance(v, list):
        return any(_has_unknown(x) for x in v)
    return False


def parse_opts(args, flags_with_value):
    """Terraform's flag syntax: -name=value or -name value (for flags that take one)."""
    opts, rest = [], []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1:
            name, eq, val = a.lstrip("-").partition("=")
            if not eq and name in flags_with_value:
                if i + 1 >= len(args):
                    raise TfError("Invalid flag", f"flag needs an argument: -{name}")
                val = args[i + 1]
                i += 1
            opts.append((name, val if (eq or name in flags_with_value) else True))
        else:
            rest.append(a)
        i += 1
    return opts, rest


def cli_vars_of(opts):
    out = []
    for k, v in opts:
        if k == "var":
            name, eq, val = v.partition("=")
            if not eq:
                raise TfError("Invalid -var option", f"The given -var option {v!r} is not correctly specified. Must "
                              "be a variable name and value separated by an equals sign, like -var=\"key=value\".")
            out.append((name, val))
        elif k == "var-file":
            raise TfError("Unsupported option", "-var-file is not implemented by the lab's Terraform stand-in: use "
                          "terraform.tfvars or *.auto.tfvars in the directory.")
    return out


KNOWN = {
    "plan": {"input", "lock", "out", "var", "replace", "target", "no-color", "refresh", "lock-timeout", "var-file"},
    "apply": {"input", "lock", "auto-approve", "var", "replace", "target", "no-color", "lock-timeout", "var-file"},
    "init": {"input", "no-color", "upgrade", "lock", "backend"},
    "show": {"no-color", "json"},
    "output": {"json", "no-color", "raw"},
    "import": {"input", "no-color", "var", "lock"},
}


def main(argv):
    chdir = "."
    while argv and argv[0].startswith("-"):
        a = argv.pop(0)
        if a.startswith("-chdir="):
            chdir = a.split("=", 1)[1]
        elif a in ("-version", "--version", "-v"):
            argv.insert(0, "version")
            break
        else:
            raise TfError("Invalid global option", f"{a} is not a global option of the lab's Terraform stand-in.")
    if not argv:
        raise TfError("No command", "Usage: terraform [-chdir=DIR] <init|plan|show|apply|output|state list|import|"
                      "version> [args]")
    cmd, args = argv[0], argv[1:]
    if cmd == "version":
        print(f"Terraform v{VERSION}\non linux_amd64\n+ provider {PROVIDER_SOURCE} v0.78.0\n\n"
              "(the RKE2 lab's stand-in, lab/terraform.py)")
        return 0
    if not os.path.isdir(chdir):
        raise TfError("Invalid -chdir option", f"The -chdir option refers to a directory that does not exist: {chdir}")
    ctx = Ctx(chdir)
    if cmd == "state":
        if args[:1] != ["list"]:
            raise TfError("Unsupported command", "the lab's Terraform stand-in implements `state list` only.")
        for a in sorted(instances(load_state(ctx.dir))):
            print(a)
        return 0
    if cmd not in KNOWN:
        raise TfError("Unsupported command", f"terraform {cmd} is not implemented by the lab's stand-in.")
    valued = {"out", "var", "replace", "target", "lock-timeout", "var-file", "input", "lock", "refresh", "backend"}
    opts, rest = parse_opts(args, {"out", "var", "replace", "target", "var-file", "lock-timeout"})
    for k, _ in opts:
        if k not in KNOWN[cmd]:
            raise TfError("Failed to parse command-line flags", f"flag provided but not defined: -{k}")
    opts = [(k, v) for k, v in opts if k in valued or v is True]
    get = lambda k: [v for n, v in opts if n == k]
    if cmd == "init":
        mod = Module(ctx.dir, ctx.dir)
        print("Initializing the backend...")
        mods = [{"Key": "", "Source": "", "Dir": "."}]
        for name, b in mod.calls.items():
            source = ev(b.attrs["source"], Scope({}), b.src)
            if not str(source).startswith(("./", "../")):
                raise TfError("Unsupported module source", f"module {name!r}: only local paths are installed by the "
                              f"lab's Terraform stand-in, not {source!r}.", b.where())
            Module(os.path.normpath(os.path.join(ctx.dir, source)), ctx.dir)
            mods.append({"Key": name, "Source": source, "Dir": os.path.normpath(source)})
            print(f"- {name} in {os.path.normpath(source)}")
        os.makedirs(os.path.join(ctx.dir, ".terraform", "modules"), exist_ok=True)
        with open(os.path.join(ctx.dir, ".terraform", "modules", "modules.json"), "w") as f:
            json.dump({"Modules": mods}, f)
        os.makedirs(os.path.join(ctx.dir, ".terraform", "providers", PROVIDER_SOURCE), exist_ok=True)
        print(f"Initializing provider plugins...\n- Using {PROVIDER_SOURCE} (the lab's Proxmox VE API stand-in)\n\n"
              "Terraform has been successfully initialized!")
        return 0
    if cmd == "plan":
        p = plan(ctx, cli_vars_of(opts), get("replace"), get("target"),
                 refresh=get("refresh") != ["false"])
        show_plan(p)
        out = get("out")
        if out:
            path = out[-1] if os.path.isabs(out[-1]) else os.path.join(ctx.dir, out[-1])
            with open(path, "w") as f:
                json.dump(p, f)
            print(f"\nSaved the plan to: {out[-1]}\n\nTo perform exactly these actions, run the following command "
                  f"to apply:\n    terraform apply \"{out[-1]}\"")
        return 0
    if cmd == "show":
        if not rest:
            st = load_state(ctx.dir)
            for a, i in sorted(instances(st).items()):
                print(f"# {a}:\nresource \"{VM}\" \"{a.split(VM + '.')[1].split('[')[0]}\" {{")
                print("\n".join(render(i["attributes"], 4, " ")) + "\n}\n")
            return 0
        p = read_plan(ctx, rest[0])
        if get("json"):
            print(json.dumps({"format_version": "1.2", "terraform_version": VERSION,
                              "resource_changes": [{"address": x["addr"], "change": {
                                  "actions": {"replace": ["delete", "create"]}.get(x["action"], [x["action"]]),
                                  "before": x["before"], "after": x["after"]}} for x in p["actions"]]}))
        else:
            show_plan(p, warn=False)
        return 0
    if cmd == "apply":
        if rest:
            if get("var") or get("replace") or get("target"):
                raise TfError("Can't set variables when applying a saved plan", "The -var, -replace and -target "
                              "options cannot be used when applying a saved plan file, because a saved plan "
                              "includes the variable values that were set when it was created.")
            p = read_plan(ctx, rest[0])
        else:
            if not get("auto-approve"):
                raise TfError("No saved plan and no -auto-approve", "The lab's Terraform stand-in does not ask "
                              "questions: pass a saved plan file or -auto-approve.")
            p = plan(ctx, cli_vars_of(opts), get("replace"), get("target"))
            show_plan(p)
        apply(ctx, p)
        return 0
    if cmd == "output":
        st = load_state(ctx.dir)
        outs = st.get("outputs", {})
        if rest:
            if rest[0] not in outs:
                raise TfError("Output not found", f"The output variable requested could not be found in the state "
                              f"file. If you recently added this to your configuration, be sure to run `terraform "
                              f"apply`, since the state won't be updated with new output variables until that "
                              f"command is run.")
            v = outs[rest[0]]["value"]
            print(json.dumps(v) if get("json") or not isinstance(v, str) else v)
            return 0
        if get("json"):
            print(json.dumps({k: {"sensitive": False, "type": o["type"], "value": o["value"]}
                              for k, o in outs.items()}, indent=2))
        else:
            for k, o in outs.items():
                print(f"{k} = {json.dumps(o['value'], indent=2)}")
        return 0
    if cmd == "import":
        if len(rest) != 2:
            raise TfError("Invalid import", "The import command expects two arguments: ADDR ID (ID = node/vmid).")
        addr, vid = rest
        mod, values = ctx.config(cli_vars_of(opts))
        st = load_state(ctx.dir)
        if addr in instances(st):
            raise TfError("Resource already managed by Terraform", f"Terraform is already managing a remote object "
                          f"for {addr}. To import to this address you must first remove the existing object from the "
                          "state.")
        want = Evaluated(mod, ctx.dir, values, {}).all_instances()
        if addr not in want:
            raise TfError("Configuration for import target does not exist", f"The configuration does not contain "
                          f"{addr}. Before importing this resource, please create its configuration.")
        node, _, vmid = vid.partition("/")
        if not vmid.isdigit():
            raise TfError("Invalid import id", f"expected node/vmid, got {vid!r}")
        cfg, _, key = want[addr]
        base = dict(jsonable(cfg), vm_id=int(vmid), id=vmid, node_name=node)
        now = read_vm(ctx.provider(mod, values), base)
        if now is None:
            raise TfError("Cannot import non-existent remote object", f"VM {vmid} does not exist on {node}.")
        put_instance(st, addr, key, now)
        save_state(ctx.dir, st)
        print(f"{addr}: Importing from ID \"{vid}\"...\n{addr}: Import prepared!\n\nImport successful!")
        return 0
    return 1


def read_plan(ctx, name):
    path = name if os.path.isabs(name) else os.path.join(ctx.dir, name)
    try:
        with open(path) as f:
            p = json.load(f)
    except (OSError, ValueError) as e:
        raise TfError("Failed to load plan file", f"Couldn't load the plan file {name}: {e}")
    if p.get("format") != "runbook-lab-terraform-plan":
        raise TfError("Failed to load plan file", f"{name} is not a plan written by this Terraform.")
    return p


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except TfError as e:
        diag("Error", e.summary, e.detail, e.where)
        sys.exit(1)
