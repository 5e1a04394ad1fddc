"""The configuration's values in their text forms: the compact layers grammar (LAYERS_GRAMMAR: parse_layers,
format_layers), KEY=VALUE arguments (parse_key_value, parse_value, format_value), the checks of TOML `layers`
arrays and scalar tables, and TOML values as config.toml writes them (toml_value, toml_key)."""

import json
import re

LAYERS_GRAMMAR = "NAME[:KEY=VALUE...][,NAME[:KEY=VALUE...]...]"
LAYERS_EXAMPLE = "affine:units=1024,batchnorm,relu,dropout:keep=0.9,affine:units=10"
VALUES_HELP = ("VALUE is true or false, an integer, a decimal number (0.5, 1e-3), a \"quoted string\" (JSON escapes) "
               "or any other word as a string")

LAYER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")  # a layer name (dpnet.plugins.records.VALIDLAYER_NAME)
OPTION_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"[+-]?\d+\Z")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+(?=[eE]))([eE][+-]?\d+)?\Z")
_WORD = re.compile(r"[^\s,:=\"]+")
_TOKENS = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|([,:=])|([^\s,:="]+)|(\S))')
SCALARS = (bool, int, float, str)


def parse_value(text):
    """A KEY=VALUE value: true/false -> bool, an integer -> int, a decimal number -> float, a JSON-quoted string ->
    that string, any other word -> the word itself."""
    text = text.strip()
    if text in ("true", "false"):
        return text == "true"
    if _INT.match(text):
        return int(text)
    if _FLOAT.match(text):
        return float(text)
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
        if not isinstance(value, str):
            raise ValueError(f"{text} is not a well-formed quoted string")
        return value
    return text


def format_value(value):
    """The text that parse_value reads back as `value` (a bool, int, float or str)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str) and _WORD.fullmatch(value) and parse_value(value) == value:
        return value
    return json.dumps(value)


def parse_key_value(text):
    """(key, value) of a KEY=VALUE argument (the value as parse_value reads it); ValueError saying what is wrong."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not OPTION_KEY.match(key):
        raise ValueError(f"expected KEY=VALUE with KEY a name (letters, digits, _), got {text!r}")
    if not value.strip():
        raise ValueError(f"{key}= has no value")
    return key, parse_value(value)


def parse_layers(text):
    """The layer list of a compact spec, LAYERS_GRAMMAR: entries separated by commas, each a layer name followed by
    ':KEY=VALUE' options (values as parse_value reads them). An entry without options is its name, one with options
    a dict {"layer": name, **options}. ValueError saying where the text is malformed."""
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKENS.match(text, pos)
        if match is None:  # only trailing white space is left
            break
        quoted, sep, word, other = match.groups()
        if other is not None:
            raise ValueError(f"malformed layer spec {text!r}: unexpected {other!r} at character {match.start(4) + 1} "
                             f"(the form is {LAYERS_GRAMMAR}, e.g. {LAYERS_EXAMPLE})")
        start = match.start(match.lastindex)
        tokens.append((start, "word" if word is not None else "quoted" if quoted is not None else sep,
                       word or quoted or sep))
        pos = match.end()
    tokens.append((len(text), "end", ""))

    def fail(i, expected):
        at, kind, value = tokens[i]
        found = "the end" if kind == "end" else repr(value)
        raise ValueError(f"malformed layer spec {text!r}: expected {expected} at character {at + 1}, found {found} "
                         f"(the form is {LAYERS_GRAMMAR}, e.g. {LAYERS_EXAMPLE})")

    entries, i = [], 0
    while True:
        if tokens[i][1] != "word" or not LAYER_NAME.match(tokens[i][2]):
            fail(i, "a layer name")
        entry, i = {"layer": tokens[i][2]}, i + 1
        while tokens[i][1] == ":":
            if tokens[i + 1][1] != "word" or not OPTION_KEY.match(tokens[i + 1][2]) or tokens[i + 1][2] == "layer":
                fail(i + 1, "an option name")
            if tokens[i + 2][1] != "=":
                fail(i + 2, f"'=' after the option {tokens[i + 1][2]}")
            if tokens[i + 3][1] not in ("word", "quoted"):
                fail(i + 3, f"a value for the option {tokens[i + 1][2]}")
            if tokens[i + 1][2] in entry:
                raise ValueError(f"malformed layer spec {text!r}: {entry['layer']} has the option "
                                 f"{tokens[i + 1][2]} twice (again at character {tokens[i + 1][0] + 1})")
            try:
                entry[tokens[i + 1][2]] = parse_value(tokens[i + 3][2])
            except ValueError as exc:
                raise ValueError(f"malformed layer spec {text!r}: {exc}") from None
            i += 4
        entries.append(entry["layer"] if len(entry) == 1 else entry)
        if tokens[i][1] == "end":
            return entries
        if tokens[i][1] != ",":
            fail(i, "',' or ':'")
        i += 1


def format_layers(spec):
    """The compact form (LAYERS_GRAMMAR) of a layer list, which parse_layers reads back as the same list."""
    parts = []
    for entry in spec:
        if isinstance(entry, dict):
            options = "".join(f":{key}={format_value(value)}" for key, value in entry.items() if key != "layer")
            parts.append(f"{entry['layer']}{options}")
        else:
            parts.append(str(entry))
    return ",".join(parts)


def layer_entries(value):
    """A TOML `layers` value as a layer list: names, and dicts {"layer": name, **scalar options} (a table without
    options becomes its name); UsageError otherwise."""
    form = "an array of layer names and inline tables {layer = NAME, option = value, ...}"
    if not isinstance(value, list) or not value:
        raise ValueError(f"layers must be {form}, got {value!r}")
    entries = []
    for i, entry in enumerate(value):
        name = entry.get("layer") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not LAYER_NAME.match(name):
            raise ValueError(f"layers[{i}] must be a layer name or an inline table with a layer name "
                             f"({form}), got {entry!r}")
        if isinstance(entry, dict):
            for key, option in entry.items():
                if not OPTION_KEY.match(key):
                    raise ValueError(f"layers[{i}] ({name}): {key!r} is not an option name")
                if not isinstance(option, SCALARS):
                    raise ValueError(f"layers[{i}] ({name}): option {key} must be a boolean, number or "
                                     f"string, got {option!r}")
            entry = {"layer": name, **{k: v for k, v in entry.items() if k != "layer"}}
            entries.append(name if len(entry) == 1 else entry)
        else:
            entries.append(name)
    return entries


def scalar_table(key, value):
    """A TOML table of KEY = scalar (optim, model_options) as a dict; UsageError otherwise."""
    toml_key = key.replace("_", "-")
    if not isinstance(value, dict):
        raise ValueError(f"{toml_key} must be a table of key = value ([{toml_key}] with one key per "
                         f"line), got {value!r}")
    for name, item in value.items():
        if not OPTION_KEY.match(name):
            raise ValueError(f"[{toml_key}]: {name!r} is not a valid key")
        if not isinstance(item, SCALARS):
            raise ValueError(f"[{toml_key}] {name} must be a boolean, number or string, got {item!r}")
    return dict(value)



def toml_value(value):
    """A value of the configuration (bool, int, float, str, or lists and tables of them) in TOML's syntax."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # a TOML integer, float or basic string
    if isinstance(value, list):
        return "[" + ", ".join(map(toml_value, value)) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{value!r} has no TOML form")


def toml_key(key):
    """A TOML key: bare where TOML allows it, else quoted."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
