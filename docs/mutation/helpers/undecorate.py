"""Make decorated functions visible to mutmut in a frozen copy, without changing behaviour.

mutmut skips decorated functions. In the copy: ``@torch.no_grad()`` def f: body  ->  def f: with torch.no_grad(): body
and ``@property`` def p  ->  def p__prop + ``p = property(p__prop)`` (properties with a setter are left alone).
Usage: python undecorate.py FILE...
"""
import sys
import libcst as cst
import libcst.matchers as m


class Undecorate(cst.CSTTransformer):
    def __init__(self, setters: set[str]):
        self.setters = setters

    def leave_FunctionDef(self, orig, node):
        if len(node.decorators) != 1:
            return node
        dec = node.decorators[0].decorator
        if m.matches(dec, m.Call(func=m.Attribute(value=m.Name("torch"), attr=m.Name("no_grad")), args=[])):
            body = list(node.body.body)
            doc = []
            if body and m.matches(body[0], m.SimpleStatementLine(body=[m.Expr(value=m.SimpleString())])):
                doc, body = [body[0]], body[1:]
            with_ = cst.With(items=[cst.WithItem(item=dec)], body=cst.IndentedBlock(body=body))
            return node.with_changes(decorators=[], body=node.body.with_changes(body=[*doc, with_]))
        if m.matches(dec, m.Name("property")) and node.name.value not in self.setters:
            new = node.with_changes(decorators=[], name=cst.Name(node.name.value + "__prop"))
            assign = cst.parse_statement(f"{node.name.value} = property({node.name.value}__prop)\n")
            return cst.FlattenSentinel([new, assign])
        return node


for path in sys.argv[1:]:
    src = open(path).read()
    tree = cst.parse_module(src)
    setters = set()
    for node in m.findall(tree, m.Decorator(decorator=m.Attribute(attr=m.Name("setter")))):
        setters.add(node.decorator.value.value)
    out = tree.visit(Undecorate(setters)).code
    if out != src:
        open(path, "w").write(out)
        print("undecorated", path)
