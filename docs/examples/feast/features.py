"""Feast definitions of the demo features: what `feast apply` registers."""

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Float64

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING)

# Long TTLs: the demo data's timestamps are spread over the last week.
TTL = timedelta(days=3650)

user_stats = FeatureView(
    name="user_stats",
    entities=[user],
    ttl=TTL,
    schema=[Field(name="activity_log", dtype=Float32), Field(name="emb", dtype=Array(Float32))],
    source=FileSource(path="data/users.parquet", timestamp_field="event_timestamp"),
)
item_stats = FeatureView(
    name="item_stats",
    entities=[item],
    ttl=TTL,
    schema=[Field(name="popularity_log", dtype=Float64), Field(name="ctr_prior", dtype=Float32)],
    source=FileSource(path="data/items.parquet", timestamp_field="event_timestamp"),
)
item_emb = FeatureView(
    name="item_emb",
    entities=[item],
    ttl=TTL,
    schema=[Field(name="emb", dtype=Array(Float32))],
    source=FileSource(path="data/item_emb.parquet", timestamp_field="event_timestamp"),
)
