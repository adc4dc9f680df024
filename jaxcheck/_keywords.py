"""Unknown keyword arguments of the entry points: a misspelt option is named with the option
meant; a keyword the function under check takes is told to be bound first."""

import dataclasses
import difflib
import functools
import inspect
import re


def checked(name: str, call: str):
    """Decorate entry point `name` (its options keyword-only), whose function under check
    is its first argument and is called as `call` (e.g. "verify(fn, params, *args)"), so
    that unknown keywords raise a TypeError that says which option was meant, or how to
    bind the function's own keywords."""

    def decorate(entry):
        names = tuple(
            p.name
            for p in inspect.signature(entry).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY
        )

        @functools.wraps(entry)
        def wrapper(*args, **kwargs):
            fn = args[0] if args else None
            refuse_unknown(name, call, kwargs, names, fn)
            out = entry(*args, **kwargs)
            shared = shared_with(fn, len(args) - 1, kwargs) if "," in call else []
            if shared and dataclasses.is_dataclass(out) and hasattr(out, "problems"):
                out = dataclasses.replace(out, problems=(shared_note(shared), *out.problems))
            return out

        return wrapper

    return decorate


def refuse_unknown(name: str, call: str, kwargs, names, fn=None) -> None:
    """Raise the TypeError of `checked` for the keywords in `kwargs` that are not among
    `names`, the options of entry point `name` called as `call`; `fn` is the function
    under check (its own keywords are told to be bound first)."""
    unknown = [k for k in kwargs if k not in names]
    if unknown:
        fn_takes = frozenset() if fn is None else _keywords_of(fn)
        raise TypeError(_unknown(name, call, unknown, tuple(names), fn_takes))


def shared_with(fn, given: int, kwargs) -> list:
    """The options in `kwargs` that `fn`, called with `given` positional arguments, also
    takes as keyword arguments of its own (a loss's `key=` for its dropout): each was
    taken as the option, and fn got none, so that it was checked at its default, perhaps
    another function than meant."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return []
    open_ = [
        p.name
        for i, p in enumerate(parameters)
        if p.kind is inspect.Parameter.KEYWORD_ONLY
        or (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and i >= given)
    ]
    return [k for k in kwargs if k in open_]


def shared_note(shared: list) -> str:
    names, bound = ", ".join(f"{k}=" for k in shared), ", ".join(f"{k}=..." for k in shared)
    return (
        f"{names} went to the check as its option, not to fn, whose own keyword argument of "
        f"that name was left at its default: to pass it to fn, bind it first, "
        f"functools.partial(fn, {bound})"
    )


def _keywords_of(fn) -> frozenset:
    """The names `fn` takes as keyword arguments (none known where its signature is not)."""
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return frozenset()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return frozenset(p.name for p in parameters if p.kind in kinds)


# what other gradient checkers (JAX's, PyTorch's) and random-number APIs call an option
OTHER_NAMES = {
    "seed": "key",
    "rng": "key",
    "rng_key": "key",
    "prng_key": "key",
    "eps": "step",
    "epsilon": "step",
    "atol": "rtol",
    "tol": "rtol",
    "modes": "mode",
}


# keywords of jax.grad that the checks need no counterpart of
NOT_NEEDED = {
    "holomorphic": "no flag is needed: complex params, args and outputs are checked by "
    "JAX's conventions, holomorphic or not",
    "allow_int": "no flag is needed: integer leaves are held fixed, and listed in the report",
}


def _unknown(name, call, unknown, names, fn_takes=frozenset()) -> str:
    inside = ",".join(re.findall(r"\(([^)]*)\)", call)).split(",")
    positional = [a.strip().lstrip("*") for a in inside if "=" not in a and "**" not in a]
    given = [k for k in unknown if k in positional]
    if given:
        return (
            f"{name} got {', '.join(f'{k}=' for k in given)} as keyword argument(s); "
            f"{', '.join(positional)} are its positional arguments: call {call}."
        )
    parts, for_fn = [], []
    for k in unknown:
        if k in NOT_NEEDED and k not in fn_takes:
            parts.append(f"{k!r} ({NOT_NEEDED[k]})")
            continue
        close = [] if k in fn_takes else difflib.get_close_matches(k, names, n=1)
        if k not in fn_takes and OTHER_NAMES.get(k) in names:
            close = [OTHER_NAMES[k]]
        parts.append(f"{k!r} (did you mean {close[0]!r}?)" if close else repr(k))
        if not close:
            for_fn.append(k)
    text = (
        f"{name} got unexpected keyword argument(s) {', '.join(parts)}; its options "
        f"are {', '.join(names)}."
    )
    if for_fn and "," in call:  # (an entry point that takes a function under check)
        fn = call[call.index("(") + 1 : call.index(",")]
        bound = ", ".join(f"{k}=..." for k in for_fn)
        partial = call.replace(f"({fn},", f"(functools.partial({fn}, {bound}),", 1)
        text += (
            f" If these are {fn}'s keyword arguments: {fn}'s inputs are positional, "
            f"{call}; bind keywords first, {partial}."
        )
    return text
