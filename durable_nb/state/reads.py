"""What a cell reads: the names a step depends on, found from its code.

A step's inputs are the existing variables it reads before binding them itself, plus the
globals used by the notebook code it calls (functions, methods of notebook classes,
decorated functions and closures). Reading errs on the safe side: a name taken as read
that is not costs at most a needless re-execution; a read that is missed can replay a
stale result.
"""

from __future__ import annotations

import ast
import functools
import re
import string
import types
from typing import Any, Callable, Iterator, Mapping

_MAGIC_CALLS = {"run_line_magic": 1, "run_cell_magic": 2}  # which argument holds code
# Calls whose text IPython expands from the namespace first (`!ls $folder`, `%cd {path}`,
# a cell magic's line): which argument holds that text.
_EXPANDED_CALLS = {"system": 0, "getoutput": 0, "run_line_magic": 1, "run_cell_magic": 1}
_DOLLAR = re.compile(r"\$(\$?[\w.]+)")  # IPython's var_expand: $name, $obj.attr; $$ escapes


def read_names(source: str) -> set[str]:
    """The bare names a cell's code reads before it binds them itself.

    `x + 1`, `x.append(1)`, `x[0] = 1` and `x += [1]` read `x`; in `x = 1; print(x)` or
    `with open(p) as f: f.read()` the cell binds the name first, so what it held before
    the cell ran cannot matter. Only unconditional top-level bindings count as binding
    first. Comprehension variables, parameters and locals are not reads; defaults,
    annotations, decorators and base classes are, and so is the code inside line and cell
    magics (`%time total = sum(data)` reads `data`).
    """
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    bound: set[str] = set()
    reads: set[str] = set()
    for statement in tree.body:
        if isinstance(statement, ast.With):
            for item in statement.items:
                reads.update(_reads(item.context_expr, frozenset(bound)))
            bound.update(_stored(item.optional_vars for item in statement.items))
            reads.update(_reads_all(statement.body, frozenset(bound)))
            continue
        reads.update(_reads(statement, frozenset(bound)))
        bound.update(_bound_by(statement))
    return reads


def _bound_by(statement: ast.stmt) -> set[str]:
    """Names an unconditional top-level statement binds."""
    if isinstance(statement, ast.Assign):
        return _stored(statement.targets)
    if isinstance(statement, ast.AnnAssign) and statement.value is not None:
        return _stored([statement.target])
    if isinstance(statement, (ast.Import, ast.ImportFrom)):
        return {(alias.asname or alias.name).split(".")[0] for alias in statement.names}
    if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {statement.name}
    return set()


def _stored(targets: Any) -> set[str]:
    return {node.id for target in targets if target is not None for node in ast.walk(target)
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def _reads_all(nodes: Any, local: frozenset[str],
               class_names: frozenset[str] = frozenset()) -> set[str]:
    found: set[str] = set()
    for node in nodes:
        if node is not None:
            found |= _reads(node, local, class_names)
    return found


def _reads(node: ast.AST, local: frozenset[str],
           class_names: frozenset[str] = frozenset()) -> set[str]:
    """Names `node` reads from the global scope, `local` being bound around it.

    `class_names` are the names of an enclosing class body (part of `local`): Python does
    not let the scopes nested in a class body (its methods, comprehensions, nested classes)
    see them, so there a read of such a name is a read of the global.
    """
    if isinstance(node, ast.Name):
        return {node.id} if isinstance(node.ctx, ast.Load) and node.id not in local else set()
    if isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
        extra = set() if node.target.id in local else {node.target.id}
        return extra | _reads(node.value, local, class_names)
    nested = local - class_names  # what a scope nested here sees
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        return _function_reads(node, local, nested)
    if isinstance(node, ast.ClassDef):
        outer = _reads_all([*node.decorator_list, *node.bases, *node.keywords], local,
                           class_names)
        own = _stored_in_scope(node.body)
        return outer | _reads_all(node.body, nested | own, frozenset(own - nested))
    if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
        inner = nested | _stored(generator.target for generator in node.generators)
        found = _reads(node.generators[0].iter, local, class_names)
        for index, generator in enumerate(node.generators):
            found |= _reads_all([generator.iter] if index else [], inner)
            found |= _reads_all(generator.ifs, inner)
        parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
        return found | _reads_all(parts, inner)
    found = _reads_all(ast.iter_child_nodes(node), local, class_names)
    if isinstance(node, ast.Call):
        found |= _magic_reads(node, local)
    return found


def _function_reads(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda,
                    local: frozenset[str], nested: frozenset[str]) -> set[str]:
    """What a function reads: its defaults, annotations and decorators where it is defined
    (`local`), its body in its own scope, which sees `nested` around it."""
    arguments = node.args
    # Evaluated where the function is defined: defaults, annotations, decorators.
    outer = [*arguments.defaults, *arguments.kw_defaults]
    parameters = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs,
                  arguments.vararg, arguments.kwarg]
    if not isinstance(node, ast.Lambda):
        outer += [*node.decorator_list, node.returns,
                  *(parameter.annotation for parameter in parameters if parameter is not None)]
    found = _reads_all(outer, local)
    names = {parameter.arg for parameter in parameters if parameter is not None}
    body = [node.body] if isinstance(node, ast.Lambda) else node.body
    declared_global = {name for statement in body for inner in ast.walk(statement)
                       if isinstance(inner, ast.Global) for name in inner.names}
    inner_local = nested | names | (_stored_in_scope(body) - declared_global)
    return found | _reads_all(body, frozenset(inner_local))


def _stored_in_scope(body: list[Any]) -> set[str]:
    """Names bound anywhere in a function or class body (Python makes them local)."""
    names: set[str] = set()
    for statement in body:
        for node in ast.walk(statement):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
    return names


def _magic_reads(call: ast.Call, local: frozenset[str]) -> set[str]:
    """`get_ipython().run_line_magic('time', 'total = sum(data)')` reads `data`;
    `get_ipython().system('ls $folder')` reads `folder`."""
    if not isinstance(call.func, ast.Attribute):
        return set()
    found: set[str] = set()
    expanded = _string_argument(call, _EXPANDED_CALLS.get(call.func.attr))
    if expanded is not None:
        found |= _expanded_reads(expanded)
    code = _string_argument(call, _MAGIC_CALLS.get(call.func.attr))
    if code is not None:
        try:
            found |= read_names(ast.unparse(ast.parse(code)))
        except SyntaxError:  # not Python (`%matplotlib inline`): no code to read
            pass
    return found - local


def _string_argument(call: ast.Call, position: int | None) -> str | None:
    argument = call.args[position] if position is not None and len(call.args) > position else None
    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
        return argument.value
    return None


def _expanded_reads(text: str) -> set[str]:
    """The names IPython's var_expand reads to fill in `$name`, `$obj.attr` and
    `{expression}` (unless a magic declines expansion: reading too much is safe)."""
    expressions = [match.group(1) for match in _DOLLAR.finditer(text)
                   if not match.group(1).startswith("$")]
    try:
        expressions += [field for _, field, _, _ in string.Formatter().parse(text) if field]
    except ValueError:  # unbalanced braces: IPython leaves such text as it is
        pass
    names: set[str] = set()
    for expression in expressions:
        try:
            tree = ast.parse(expression.strip(), mode="eval")
        except SyntaxError:
            continue
        names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    return names


def notebook_functions(value: Any) -> Iterator[types.FunctionType]:
    """The Python functions behind a value that can be called: itself, a bound method's
    function, what a decorator or `functools.partial` wraps, the methods of a class or of
    an instance's class."""
    if isinstance(value, types.FunctionType):
        yield value
        for cell in value.__closure__ or ():
            try:
                contents = cell.cell_contents
            except ValueError:  # not assigned yet
                continue
            if isinstance(contents, (types.FunctionType, functools.partial)):
                yield from notebook_functions(contents)
        return
    if isinstance(value, types.MethodType):
        yield from notebook_functions(value.__func__)
        return
    if isinstance(value, functools.partial):
        yield from notebook_functions(value.func)
        return
    wrapped = getattr(value, "__wrapped__", None) if not isinstance(value, type) else None
    if wrapped is not None and wrapped is not value:
        yield from notebook_functions(wrapped)
    kind = value if isinstance(value, type) else type(value)
    if kind.__module__ != "__main__":
        return
    for klass in kind.__mro__:
        if klass.__module__ != "__main__":
            continue
        for member in vars(klass).values():
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            elif isinstance(member, property):
                for accessor in (member.fget, member.fset, member.fdel):
                    if isinstance(accessor, types.FunctionType):
                        yield accessor
                continue
            if isinstance(member, types.FunctionType):
                yield from notebook_functions(member)


def globals_used_by(value: Any, namespace: Mapping[str, Any], seen: set[int]) -> set[str]:
    """Global names the notebook code behind `value` uses, following the notebook code
    those names hold in turn."""
    found: set[str] = set()
    for function in notebook_functions(value):
        if id(function) in seen or function.__globals__ is not namespace:
            continue
        seen.add(id(function))
        codes = [function.__code__]
        while codes:
            code = codes.pop()
            found.update(name for name in code.co_names if name in namespace)
            codes.extend(const for const in code.co_consts if isinstance(const, types.CodeType))
    for name in list(found):
        found |= globals_used_by(namespace[name], namespace, seen)
    return found


def input_names(source: str, namespace: Mapping[str, Any],
                is_hidden: Callable[[str], bool]) -> set[str]:
    """The existing variables a step can read: the names its code reads, and the globals
    used by the notebook code among them."""
    names = {name for name in read_names(source) if name in namespace}
    seen: set[int] = set()
    for name in list(names):
        names |= globals_used_by(namespace[name], namespace, seen)
    return {name for name in names if not is_hidden(name)}
