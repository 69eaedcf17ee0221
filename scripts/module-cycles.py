"""Import cycles between the modules of a Rust crate, for CI (.ci/run).

    python3 scripts/module-cycles.py lablink-core/src src ...

Each .rs file is a module; module A depends on B when A names B's items (through
`use crate::...`, a `crate::b::...` path, a crate-root re-export of B's item, or a sibling's
`super::b::...`). A child using its parent's items is the module tree, not a cycle; doc
comments and `#[cfg(test)]` code do not count. Prints each cycle; exits 1 if there is one."""
import os, re, sys, itertools
def check(root):
    files = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            if f.endswith('.rs'):
                p = os.path.join(d, f)
                rel = os.path.relpath(p, root)[:-3]
                mod = rel.replace('/mod', '').replace('/', '::')
                if mod in ('lib',): mod = ''
                files[mod] = open(p).read()
    # item -> defining module (top-level items of each file)
    defs = {}
    for mod, text in files.items():
        for m in re.finditer(r'^(?:pub(?:\([^)]*\))?\s+)?(?:async\s+)?(?:struct|enum|trait|fn|type|const|static|mod)\s+([A-Za-z_][A-Za-z0-9_]*)', text, re.M):
            defs.setdefault(m.group(1), set()).add(mod)
    def strip_tests(text):
        i = text.find('#[cfg(test)]')
        text = text if i < 0 else text[:i]
        return '\n'.join(l for l in text.split('\n') if not l.strip().startswith('//'))
    edges = {m: set() for m in files}
    for mod, text in files.items():
        text = strip_tests(text)
        names = set()
        for m in re.finditer(r'use crate::\{([^;]*)\};', text, re.S):
            names |= {n.strip().split(' as ')[0].split('::')[-1] for n in m.group(1).replace('\n', ' ').split(',') if n.strip()}
        for m in re.finditer(r'(?:use )?crate::((?:[a-z_][a-z0-9_]*::)*)([A-Za-z_][A-Za-z0-9_]*)', text):
            path = m.group(1).rstrip(':')
            if path:
                top = path.split('::')
                # the deepest known module on the path
                for k in range(len(top), 0, -1):
                    cand = '::'.join(top[:k])
                    if cand in files:
                        edges[mod].add(cand); break
            elif m.group(2) in files:
                edges[mod].add(m.group(2))
            else:
                names.add(m.group(2))
        for n in names:
            for d in defs.get(n, ()):
                if d != mod and d != '':
                    edges[mod].add(d)
        parent = mod.rsplit('::', 1)[0] if '::' in mod else ''
        for m in re.finditer(r'super::([a-z_][a-z0-9_]*)::', text):
            sib = (parent + '::' if parent else '') + m.group(1)
            if sib in files and sib != mod: edges[mod].add(sib)
        for m in re.finditer(r'super::\{([^;]*)\}', text, re.S):
            for n in m.group(1).replace('\n', ' ').split(','):
                n = n.strip()
                first = n.split('::')[0]
                sib = (parent + '::' if parent else '') + first
                if '::' in n and sib in files and sib != mod: edges[mod].add(sib)
        # a child's use of its parent's items is the module tree, not an import cycle
    # collapse: report strongly connected components of size > 1
    index = {}; low = {}; stack = []; on = set(); out = []; c = [0]
    sys.setrecursionlimit(10000)
    def sc(v):
        index[v] = low[v] = c[0]; c[0] += 1; stack.append(v); on.add(v)
        for w in edges[v]:
            if w not in files: continue
            if w not in index: sc(w); low[v] = min(low[v], low[w])
            elif w in on: low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop(); on.discard(w); comp.append(w)
                if w == v: break
            if len(comp) > 1: out.append(sorted(comp))
    for v in files:
        if v not in index: sc(v)
    for comp in out:
        print('cycle:', comp)
        for a in comp:
            print('   ', a, '->', sorted(e for e in edges[a] if e in comp))
    print(len(out), 'cycles')
    return len(out)


found = 0
for root in sys.argv[1:]:
    print(root, end=': ')
    found += check(root)
sys.exit(1 if found else 0)
