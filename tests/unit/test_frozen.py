"""app/domain/frozen.py: the quicker ``__init__`` and ``replace`` of the hot frozen
dataclasses build exactly what the dataclass's own would, and the classes stay frozen."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any

import pytest

from app import record_failures
from app.domain import frozen
from app.domain import transfer_saga as saga_core

QUICK = [saga_core.Transfer, saga_core.SendReply, saga_core.SendAccountCommand,
         saga_core.SendFundingCommand, saga_core.SendOtp, saga_core.PublishTransferEvent,
         saga_core.ReleaseLimit, saga_core.Saga, record_failures.Outbound,
         record_failures.SourceRecord]


def plain_twin(cls: type) -> Any:
    """The same fields as ``cls`` in a dataclass left as ``dataclass`` made it."""
    return dataclasses.make_dataclass(
        "Twin", [(f.name, f.type, field(default=f.default, compare=f.compare, repr=f.repr))
                 if f.default is not dataclasses.MISSING else (f.name, f.type)
                 for f in dataclasses.fields(cls)], frozen=True, slots=True)


def sample_args(cls: type) -> dict[str, Any]:
    """A distinct value for every field, required and defaulted alike."""
    return {f.name: f"value-{i}" for i, f in enumerate(dataclasses.fields(cls))}


def as_dict(obj: Any) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def test_every_quick_class_is_marked() -> None:
    for module in (saga_core, record_failures):
        marked = {obj for obj in vars(module).values()
                  if isinstance(obj, type) and hasattr(obj, frozen._REPLACE)
                  and obj.__module__ == module.__name__}
        assert marked == {c for c in QUICK if c.__module__ == module.__name__}


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__qualname__)
def test_same_signature_as_the_dataclass_own(cls: type) -> None:
    def shape(c: type) -> list[tuple[str, Any, Any]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(c).parameters.values()]

    assert shape(cls) == shape(plain_twin(cls))


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__qualname__)
def test_builds_what_the_dataclass_builds(cls: type) -> None:
    args = sample_args(cls)
    twin = plain_twin(cls)
    assert as_dict(cls(**args)) == as_dict(twin(**args))
    positional = list(args.values())
    assert as_dict(cls(*positional)) == args
    required = {f.name: args[f.name] for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING}
    assert as_dict(cls(**required)) == as_dict(twin(**required))  # the defaults
    with pytest.raises(TypeError):
        cls(**args, not_a_field=1)
    if required:
        with pytest.raises(TypeError):
            cls()


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__qualname__)
def test_still_frozen_compared_and_hashed(cls: type) -> None:
    args = sample_args(cls)
    obj = cls(**args)
    name = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, name, "changed")
    assert getattr(obj, name) == args[name]
    assert obj == cls(**args)
    assert hash(obj) == hash(cls(**args))
    assert not hasattr(obj, "__dict__")  # still slotted


@pytest.mark.parametrize("cls", QUICK, ids=lambda c: c.__qualname__)
def test_replace_as_dataclasses_replace(cls: type) -> None:
    args = sample_args(cls)
    obj = cls(**args)
    names = [f.name for f in dataclasses.fields(cls)]
    for name in (names[0], names[-1]):
        new = frozen.replace(obj, **{name: "new"})
        assert as_dict(new) == as_dict(dataclasses.replace(obj, **{name: "new"}))
        assert type(new) is cls
        assert as_dict(obj) == args  # the original untouched
    assert frozen.replace(obj) == obj
    with pytest.raises(TypeError, match="not_a_field"):
        frozen.replace(obj, not_a_field=1)


def test_replace_of_another_dataclass_is_dataclasses_replace() -> None:
    @dataclass(frozen=True)
    class Plain:
        a: int
        b: int = 2

    assert frozen.replace(Plain(1), b=5) == Plain(1, 5)


def test_refuses_what_it_does_not_build() -> None:
    @dataclass(frozen=True)
    class NoSlots:
        a: int

    @dataclass(slots=True)
    class NotFrozen:
        a: int

    @dataclass(frozen=True, slots=True)
    class PostInit:
        a: int

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class Factory:
        a: list[int] = field(default_factory=list)

    @dataclass(frozen=True, slots=True)
    class NotInit:
        a: int = field(default=1, init=False)

    @dataclass(frozen=True, slots=True, kw_only=True)
    class KwOnly:
        a: int

    @dataclass(frozen=True, slots=True)
    class Base:
        a: int

    @dataclass(frozen=True, slots=True)
    class Inherits(Base):  # ``a`` is a slot of Base's, not of this class
        b: int = 0

    @dataclass(frozen=True, slots=True)
    class SelfNamed:
        self: int

    for cls in (NoSlots, NotFrozen, PostInit, Factory, NotInit, KwOnly, Inherits, SelfNamed):
        with pytest.raises(TypeError):
            frozen.quick(cls)


def test_replace_of_a_subclass_keeps_its_type_and_fields() -> None:
    """A subclass of a quick class is not one: its copies are ``dataclasses.replace``'s,
    of its own type, with its own fields (the generated copy builds the base class)."""
    @frozen.quick
    @dataclass(frozen=True, slots=True)
    class Base:
        a: int
        b: str = "x"

    @dataclass(frozen=True)
    class Sub(Base):
        c: int = 0

    class Plain(Base):
        __slots__ = ()

    sub = Sub(1, "y", 3)
    assert frozen.replace(sub, b="z") == Sub(1, "z", 3)
    assert type(frozen.replace(sub, c=9)) is Sub and frozen.replace(sub, c=9).c == 9
    assert type(frozen.replace(Plain(1), a=2)) is Plain
    assert frozen.replace(Base(1), b="q") == Base(1, "q")
    with pytest.raises(TypeError):
        frozen.replace(sub, d=1)
