"""Overrides a script's settings (its module-level globals) from config files, plain Python that may only assign existing
keys, and --key=value arguments (Python literals, else strings), left to right. A mistake is one line on stderr (fail)."""
import ast, difflib, os, re, sys, types

def fail(msg, kind='config'):
    """The one way to fail: "<kind> error: <msg>" on stderr (kind: config, out_dir, data, checkpoint), exit status 2."""
    print(f"{kind} error: {msg}", file=sys.stderr)
    e, e.code = SystemExit(msg), 2  # str(e) is the message, for a caller that catches it
    raise e

def declared(path=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'train.py')):
    """The settings the script at path declares (its literal assignments above its '# ---' line); by default train.py's."""
    source = open(path).read().split('\n# ---')[0]
    return {t.id: ast.literal_eval(n.value) for n in ast.parse(source).body if isinstance(n, ast.Assign) for t in n.targets}

def checked(key, value, config, where):
    """The value for key, converted where that loses nothing (int -> float); fails on a wrong type."""
    if key not in config:
        fail(f"unknown key '{key}'{where}; closest valid keys: {', '.join(difflib.get_close_matches(key, config, 3, 0.5)) or '(none)'}")
    value = float(value) if type(config[key]) is float and type(value) is int else value
    if None not in (config[key], value) and type(value) is not type(config[key]):  # a None default takes any value
        fail(f"{key}={value!r}{where} has type {type(value).__name__}, expected {type(config[key]).__name__}")
    return value

def usage(config, flags):
    """--help: the running script's docstring, then each setting with its default and its comment (from its lines)."""
    source = open(sys.argv[0]).read()
    print((ast.get_docstring(ast.parse(source)) or '').strip() + "\n\nsettings (--key=value, or a config file):")
    for key, comment in re.findall(r"^(\w+) = .*?(?:#\s*(.*(?:\n[ \t]+#.*)*))?$", source.split('\n# ---')[0], re.M):
        if key in config:  # a comment goes on over the indented comment lines below it
            print(f"  --{key}{'' if key in flags else f'={config[key]!r}'}".ljust(36) + " " + re.sub(r"\s*\n\s*#\s*", " ", comment))
    sys.exit(0)

def configure(config, args, flags=()):
    """Apply config files and --key=value args to the dict `config` (the script's settings) in place; `flags`: keys given bare."""
    if {'-h', '--help'} & set(args):
        usage(config, flags)
    for arg in args:
        where = '' if arg.startswith('--') else f" in {arg}"
        if where:  # a config file, run with the current values in scope
            if not os.path.isfile(arg):
                fail(f"config file {arg} is a directory, not a file" if os.path.isdir(arg) else f"config file not found: {arg}")
            try:  # a config may build on another beside it (configs/imagenette.py)
                exec(compile(open(arg).read(), arg, 'exec'), scope := {**config, '__file__': arg})
            except Exception as e:
                fail(f"{arg}: {type(e).__name__}: {e}")
            changes = {k: v for k, v in scope.items() if not k.startswith('_') and not isinstance(v, types.ModuleType)
                       and (k not in config or v != config[k] or type(v) is not type(config[k]))}
        else:
            key, eq, raw = arg[2:].partition('=')
            if (key in flags) == bool(eq):  # a flag is given bare, any other key with its value
                fail(f"--{key} is a flag, given bare: got '{arg}'" if eq else f"expected --key=value, got '{arg}'")
            try:
                changes = {key: True if key in flags else raw if isinstance(config.get(key), str) else ast.literal_eval(raw)}
            except (ValueError, SyntaxError):
                changes = {key: raw}
        for k, v in changes.items():
            config[k] = checked(k, v, config, where)
            if os.environ.get('RANK', '0') == '0':  # one process of a torchrun speaks
                print(f"override{where}: {k} = {config[k]!r}")
