"""One registry of per-op channel rules. An op without a rule freezes the channels it touches."""
from __future__ import annotations

from .base import ChannelInfo, Layer, Member, RewriteContext, Rule, Source, TraceState, UnionFind
from . import elementwise, heads, layers, structural

#: layers create channels even when no input carries traced channels
SOURCE_OPS = frozenset(r for rule in layers.RULES for r in rule.ops)


def build_registry(rules) -> dict[str, Rule]:
    registry: dict[str, Rule] = {}
    for rule in rules:
        for op in rule.ops:
            if op in registry:
                raise ValueError(f"two rules for {op}")
            registry[op] = rule
    return registry


REGISTRY: dict[str, Rule] = build_registry([*layers.RULES, *elementwise.RULES, *structural.RULES, *heads.RULES])

__all__ = ["REGISTRY", "SOURCE_OPS", "ChannelInfo", "Layer", "Member", "RewriteContext", "Rule", "Source",
           "TraceState", "UnionFind", "build_registry"]
