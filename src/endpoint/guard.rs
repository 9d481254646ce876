//! The SSRF guard: a client-supplied endpoint must not make hallmark reach into private networks,
//! the machine itself, or a cloud metadata service, unless that is explicitly allowed.
//!
//! The host is resolved once, every address is checked, and the client is pinned to the checked
//! address, so a DNS answer that changes between check and use (rebinding) cannot get around the
//! guard. Redirects are not followed.

use super::EndpointError;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Whether private addresses may be contacted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressPolicy {
    /// Public addresses only.
    PublicOnly,
    /// Any address (tests, local model servers).
    AllowPrivate,
}

/// Why an address is not public, or `None` when it is. Follows IANA's IPv4 and IPv6
/// special-purpose address registries: every range there that is not globally reachable is
/// refused, and addresses that embed an IPv4 address (IPv4-mapped, IPv4-compatible, NAT64, 6to4)
/// are judged by the address they embed.
pub fn non_public_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => v6_reason(v6),
    }
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

fn v6_reason(v6: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = v6.to_ipv4_mapped() {
        return v4_reason(v4);
    }
    let seg = v6.segments();
    if v6.is_loopback() {
        Some("loopback address")
    } else if v6.is_unspecified() {
        Some("unspecified address")
    } else if seg[..6] == [0; 6] {
        // ::a.b.c.d, IPv4-compatible (deprecated): refused whatever it embeds, as some stacks
        // still route it to the embedded IPv4 address.
        Some("IPv4-compatible address")
    } else if v6.is_multicast() {
        Some("multicast address")
    } else if seg[0] & 0xffc0 == 0xfe80 {
        Some("link-local address")
    } else if seg[0] & 0xffc0 == 0xfec0 {
        Some("site-local address")
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some("unique local (private) address")
    } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2..6] == [0; 4] {
        // NAT64 (64:ff9b::/96) embeds an IPv4 address in the low 32 bits.
        v4_reason(embedded_v4(seg[6], seg[7]))
    } else if seg[0] == 0x64 && seg[1] == 0xff9b && seg[2] == 1 {
        Some("local-use NAT64 address")
    } else if seg[0] == 0x2002 {
        // 6to4 (2002::/16) embeds an IPv4 address in bits 16 to 48.
        v4_reason(embedded_v4(seg[1], seg[2]))
    } else if seg[0] == 0x100 && seg[1..4] == [0; 3] {
        Some("discard-only address")
    } else if seg[0] == 0x2001 && seg[1] < 0x200 {
        // 2001::/23: IETF protocol assignments (Teredo, benchmarking, ORCHID and others).
        Some("IETF protocol assignment (Teredo, benchmarking and others)")
    } else if (seg[0] == 0x2001 && seg[1] == 0xdb8) || seg[0] & 0xfff0 == 0x3ff0 {
        Some("documentation address")
    } else if v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        Some("cloud metadata service")
    } else {
        None
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback address")
    } else if ip.is_private() {
        Some("private address")
    } else if o[0] == 169 && o[1] == 254 {
        if o[2] == 169 && o[3] == 254 {
            Some("cloud metadata service")
        } else {
            Some("link-local address")
        }
    } else if o[0] == 0 {
        Some("unspecified address")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (carrier-grade NAT) address")
    } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
        Some("IETF protocol assignment")
    } else if (o[0] == 192 && o[1] == 0 && o[2] == 2)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    {
        Some("documentation address")
    } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
        Some("benchmarking address")
    } else if o[0] == 192 && o[1] == 88 && o[2] == 99 {
        Some("6to4 relay anycast address")
    } else if ip.is_broadcast() || ip.is_multicast() || o[0] >= 240 {
        Some("broadcast, multicast or reserved address")
    } else {
        None
    }
}

/// Resolves the URL's host and checks every address; returns the host name and the address to
/// pin the client to.
pub async fn check_address(
    url: &url::Url,
    policy: AddressPolicy,
) -> Result<(String, SocketAddr), EndpointError> {
    let refused = |reason: String| EndpointError::Refused {
        url: url.to_string(),
        reason,
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Err(EndpointError::Config(format!(
            "{url}: only http and https URLs are supported"
        )));
    }
    let host = url
        .host_str()
        .ok_or_else(|| EndpointError::Config(format!("{url}: no host")))?;
    let port = url.port_or_known_default().unwrap_or(80);
    let lookup_host = host.trim_start_matches('[').trim_end_matches(']');
    if policy == AddressPolicy::PublicOnly {
        let lower = lookup_host.to_ascii_lowercase();
        if lower == "localhost"
            || lower.ends_with(".localhost")
            || lower == "metadata.google.internal"
        {
            return Err(refused(format!("{host} is a local or metadata host name")));
        }
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((lookup_host, port))
        .await
        .map_err(|e| EndpointError::Transport {
            url: url.to_string(),
            message: format!("cannot resolve {host}: {e}"),
        })?
        .collect();
    let first = *addrs.first().ok_or_else(|| EndpointError::Transport {
        url: url.to_string(),
        message: format!("{host} has no address"),
    })?;
    if policy == AddressPolicy::PublicOnly
        && let Some(reason) = addrs.iter().find_map(|a| non_public_reason(a.ip()))
    {
        // The address itself is not echoed: it would tell a client what the server's resolver
        // knows of internal host names.
        return Err(refused(format!("{host} resolves to a {reason}")));
    }
    Ok((lookup_host.to_string(), first))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_special_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd12::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a00:1",
            "fd00:ec2::254",
            "224.0.0.1",
            "::127.0.0.1",
            "::8.8.8.8",
            "2002:7f00:1::",
            "2002:a00:1::1",
            "fec0::1",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.0.1",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "192.88.99.1",
            "2001:db8::1",
            "3fff::1",
            "2001::1",
            "2001:2::1",
            "100::1",
            "64:ff9b:1::1",
        ] {
            assert!(
                non_public_reason(ip.parse().unwrap()).is_some(),
                "{ip} passed"
            );
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "172.32.0.1",
            "198.20.0.1",
            "192.0.3.1",
            "2002:808:808::1",
            "64:ff9b::808:808",
            "2001:4860:4860::8888",
        ] {
            assert!(
                non_public_reason(ip.parse().unwrap()).is_none(),
                "{ip} refused"
            );
        }
        assert_eq!(
            non_public_reason("169.254.169.254".parse().unwrap()),
            Some("cloud metadata service")
        );
    }

    #[tokio::test]
    async fn loopback_urls_are_refused_unless_allowed() {
        for u in [
            "http://127.0.0.1:9/x",
            "http://localhost:9/",
            "http://[::1]:9/",
            "http://169.254.169.254/latest/meta-data",
        ] {
            let url = url::Url::parse(u).unwrap();
            let e = check_address(&url, AddressPolicy::PublicOnly)
                .await
                .unwrap_err();
            assert!(matches!(e, EndpointError::Refused { .. }), "{u}: {e}");
        }
        let url = url::Url::parse("http://127.0.0.1:9/x").unwrap();
        assert!(
            check_address(&url, AddressPolicy::AllowPrivate)
                .await
                .is_ok()
        );
        let ftp = url::Url::parse("ftp://8.8.8.8/").unwrap();
        assert!(matches!(
            check_address(&ftp, AddressPolicy::PublicOnly).await,
            Err(EndpointError::Config(_))
        ));
    }
}
