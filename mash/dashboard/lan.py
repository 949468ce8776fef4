"""This machine on the farm's network: its addresses, its mDNS names, who counts as "on our
own private subnet", and which URL a phone should be given (CONTRACT §10).

The interface addresses come from ``ifaddr`` (zeroconf's own dependency: getifaddrs, no
subprocess); a read costs a few hundred microseconds, so the advertiser can poll it every few
seconds to notice a Wi-Fi join or a DHCP renewal.
"""
from __future__ import annotations

import ipaddress
import re

import ifaddr

SERVICE = "_mash-iot._tcp.local."
HTTP_SERVICE = "_http._tcp.local."


def sid(serial: str) -> str:
    """CONTRACT §10's ``sid``: the serial lower-cased, anything outside ``[a-z0-9-_]`` -> ``-``."""
    return re.sub(r"[^a-z0-9\-_]", "-", serial.lower())


def host_label(serial: str) -> str:
    """The mDNS host name (without ``.local``): ``mash-<sid>``, or ``<sid>`` itself when it
    already starts with ``mash-`` (every MASH serial does, so a MASH device's host is the
    contract's ``<sid>.local``). ``_`` is not allowed in a host name, so it becomes ``-``."""
    label = sid(serial).replace("_", "-").strip("-") or "gateway"
    return label if label.startswith("mash-") else f"mash-{label}"


def host_name(serial: str) -> str:
    """``mash-<sid>.local``: the name the SRV record points at and the links use."""
    return f"{host_label(serial)}.local"


def interface_networks() -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """Every address of every interface, with its prefix (``10.0.0.5/24``)."""
    found = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            address = ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip
            try:
                found.append(ipaddress.ip_interface(f"{address.split('%')[0]}/{ip.network_prefix}"))
            except ValueError:
                continue
    return found


def lan_ipv4(interfaces=None) -> list[str]:
    """This machine's private IPv4 addresses (not loopback, not link-local), in interface
    order: what mDNS advertises and the pairing QR carries (the app uses IPv4 only)."""
    interfaces = interface_networks() if interfaces is None else interfaces
    out = []
    for i in interfaces:
        a = i.ip
        if (a.version == 4 and a.is_private and not a.is_loopback and not a.is_link_local
                and str(a) not in out):
            out.append(str(a))
    return out


def on_own_private_subnet(remote: str | None, interfaces=None) -> bool:
    """A client we take writes from: this machine itself (loopback), or an address inside
    one of this machine's own private subnets (the farm's Wi-Fi, its LAN). Not a public or
    carrier-grade-NAT address, even on a directly connected network, and not a network only
    reachable through a router."""
    if not remote:
        return False
    try:
        addr = ipaddress.ip_address(remote.split("%")[0])
    except ValueError:
        return False
    if getattr(addr, "ipv4_mapped", None):
        addr = addr.ipv4_mapped
    if addr.is_loopback:
        return True
    if not addr.is_private:
        return False
    interfaces = interface_networks() if interfaces is None else interfaces
    return any(i.network.version == addr.version and i.ip.is_private and not i.ip.is_loopback
               and addr in i.network for i in interfaces)


def reachable_host(bind: str) -> bool:
    """A server bound to ``bind`` can be reached from another machine."""
    if bind in ("", "0.0.0.0", "::"):
        return True
    try:
        return not ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return bind != "localhost"


def url_host(serial: str, advertised: bool, bind: str, addresses: list[str]) -> str | None:
    """The host a phone is given for a server bound to ``bind`` (item 4 of the rule in
    docs/DESIGN.md): the ``.local`` name while our advertiser answers for it on the LAN,
    else the current address (the one it is bound to, or the first LAN address); None when
    the server is not reachable from the LAN at all."""
    if not reachable_host(bind):
        return None
    if advertised:
        return host_name(serial)
    if bind not in ("", "0.0.0.0", "::"):
        return bind
    return addresses[0] if addresses else None
