"""The few Feast protobuf messages the gateway reads, declared here (not imported from feast).

The gateway parses Feast's file registry at start and decodes ``ValueProto`` values that
the vectorised paths in feast_store.py do not cover. The ``feast`` package cannot be a
run-time dependency: it pins numpy >= 2 and redis < 8 (feast 0.67), which the gateway's
test stack (nvidia-pytriton 0.7: numpy < 2) and redis-py 8 rule out, and it is hundreds
of MB. The protobuf wire format identifies fields by number, so a message declared with
a subset of a message's fields parses the real bytes (unknown fields are skipped). The
field numbers below are Feast's, from ``protos/feast/core/{Registry,Entity,FeatureView,
Feature}.proto`` and ``protos/feast/types/Value.proto`` (checked against feast 0.67.0);
enum fields are declared as int32, which has the same varint encoding.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto
_STRING, _INT32, _INT64, _BOOL, _FLOAT, _DOUBLE, _MSG = (
    _F.TYPE_STRING,
    _F.TYPE_INT32,
    _F.TYPE_INT64,
    _F.TYPE_BOOL,
    _F.TYPE_FLOAT,
    _F.TYPE_DOUBLE,
    _F.TYPE_MESSAGE,
)
_REPEATED, _OPTIONAL = _F.LABEL_REPEATED, _F.LABEL_OPTIONAL
# Our own package name, so these never clash with feast's classes in one process.
_PACKAGE = "gateway_feast_subset"

# name -> [(field name, number, type, repeated?, message type name)]
_MESSAGES: dict[str, list[tuple[str, int, int, bool, str]]] = {
    "Registry": [
        ("entities", 1, _MSG, True, "Entity"),
        ("feature_views", 6, _MSG, True, "FeatureView"),
    ],
    "Entity": [("spec", 1, _MSG, False, "EntitySpecV2")],
    "EntitySpecV2": [
        ("name", 1, _STRING, False, ""),
        ("value_type", 2, _INT32, False, ""),
        ("join_key", 4, _STRING, False, ""),
        ("project", 9, _STRING, False, ""),
    ],
    "FeatureView": [("spec", 1, _MSG, False, "FeatureViewSpec")],
    "FeatureViewSpec": [
        ("name", 1, _STRING, False, ""),
        ("project", 2, _STRING, False, ""),
        ("entities", 3, _STRING, True, ""),
        ("features", 4, _MSG, True, "FeatureSpecV2"),
        ("online", 8, _BOOL, False, ""),
    ],
    "FeatureSpecV2": [
        ("name", 1, _STRING, False, ""),
        ("value_type", 2, _INT32, False, ""),
    ],
    "FloatList": [("val", 1, _FLOAT, True, "")],
    "DoubleList": [("val", 1, _DOUBLE, True, "")],
    "Int32List": [("val", 1, _INT32, True, "")],
    "Int64List": [("val", 1, _INT64, True, "")],
    "BoolList": [("val", 1, _BOOL, True, "")],
    "Value": [
        ("int32_val", 3, _INT32, False, ""),
        ("int64_val", 4, _INT64, False, ""),
        ("double_val", 5, _DOUBLE, False, ""),
        ("float_val", 6, _FLOAT, False, ""),
        ("bool_val", 7, _BOOL, False, ""),
        ("int32_list_val", 13, _MSG, False, "Int32List"),
        ("int64_list_val", 14, _MSG, False, "Int64List"),
        ("double_list_val", 15, _MSG, False, "DoubleList"),
        ("float_list_val", 16, _MSG, False, "FloatList"),
        ("bool_list_val", 17, _MSG, False, "BoolList"),
        ("null_val", 19, _INT32, False, ""),
    ],
}
# A oneof in Feast's Value: which field is set tells the value's type.
_VALUE_ONEOF = "val"


def _build() -> dict[str, Any]:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="gateway_feast_subset.proto", package=_PACKAGE, syntax="proto3"
    )
    for msg_name, fields in _MESSAGES.items():
        msg = fdp.message_type.add(name=msg_name)
        if msg_name == "Value":
            msg.oneof_decl.add(name=_VALUE_ONEOF)
        for name, number, ftype, repeated, type_name in fields:
            f = msg.field.add(
                name=name,
                number=number,
                type=ftype,
                label=_REPEATED if repeated else _OPTIONAL,
            )
            if type_name:
                f.type_name = f".{_PACKAGE}.{type_name}"
            if msg_name == "Value":
                f.oneof_index = 0
            if repeated and ftype not in (_STRING, _MSG):
                f.options.packed = True
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_PACKAGE}.{name}"))
        for name in _MESSAGES
    }


_CLASSES = _build()
Registry: Any = _CLASSES["Registry"]
Value: Any = _CLASSES["Value"]

# Feast's ValueType enum (protos/feast/types/Value.proto), the members the gateway reads.
BYTES, STRING, INT32, INT64, DOUBLE, FLOAT, BOOL = 1, 2, 3, 4, 5, 6, 7
INT32_LIST, INT64_LIST, DOUBLE_LIST, FLOAT_LIST, BOOL_LIST = 13, 14, 15, 16, 17
SCALAR_TYPES = {INT32: "INT32", INT64: "INT64", DOUBLE: "DOUBLE", FLOAT: "FLOAT", BOOL: "BOOL"}
LIST_TYPES = {
    INT32_LIST: "INT32_LIST",
    INT64_LIST: "INT64_LIST",
    DOUBLE_LIST: "DOUBLE_LIST",
    FLOAT_LIST: "FLOAT_LIST",
    BOOL_LIST: "BOOL_LIST",
}


def value_as_floats(raw: bytes) -> list[float] | None:
    """A serialized ``ValueProto`` as floats (one for a scalar), or None when it is null,
    empty or not numeric. The slow path: one protobuf parse per value."""
    v = Value.FromString(raw)
    which = v.WhichOneof(_VALUE_ONEOF)
    if which is None or which == "null_val":
        return None
    got = getattr(v, which)
    if which.endswith("_list_val"):
        return [float(x) for x in got.val]
    return [float(got)]
