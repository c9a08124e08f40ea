"""The placement metadata in each domain's XML, written and read in one place.

`<metadata><pp:placement xmlns:pp="urn:pausepatch:placement:1" availability-set="web"
update-domain="0" fault-domain="1" ip="10.1.0.4"/></metadata>`: every attribute is optional; a VM
without a set is standalone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from xml.sax.saxutils import quoteattr

PLACEMENT_NS = "urn:pausepatch:placement:1"
"""XML namespace of the placement element (a fixed interface)."""

PLACEMENT_KEYS = ("availability_set", "update_domain", "fault_domain", "ip")
"""Placement fields as in `VMInfo`; the XML attributes use dashes instead of underscores."""

Placement = Mapping[str, str | int | None]


def placement_element(placement: Placement) -> str:
    """The `<pp:placement>` element; keys whose value is None are left out."""
    unknown = set(placement) - set(PLACEMENT_KEYS)
    if unknown:
        raise ValueError(f"unknown placement keys {sorted(unknown)}; known: {PLACEMENT_KEYS}")
    attributes = "".join(
        f" {key.replace('_', '-')}={quoteattr(str(value))}"
        for key, value in placement.items()
        if value is not None
    )
    return f'<pp:placement xmlns:pp="{PLACEMENT_NS}"{attributes}/>'


def parse_placement(xml: str | None) -> dict[str, Any]:
    """Placement fields from the element libvirt returns for our namespace (all optional)."""
    if not xml:
        return {}
    element = ET.fromstring(xml)

    def as_int(name: str) -> int | None:
        value = element.get(name)
        return int(value) if value not in (None, "") else None

    return {
        "availability_set": element.get("availability-set") or None,
        "update_domain": as_int("update-domain"),
        "fault_domain": as_int("fault-domain"),
        "ip": element.get("ip") or None,
    }
