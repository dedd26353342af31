//! The address a client connects from, as far as it can be known.
//!
//! `X-Forwarded-For` is text any client can send, so it is believed only
//! when the TCP peer is one of `TRACKER_TRUSTED_PROXIES`. Each trusted proxy
//! appends the address it saw, so the list is read from the right: trusted
//! proxies are skipped, and the first other address is the client. Anything
//! to its left was written by the client itself and is ignored.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;

use crate::config::TrustedProxies;

/// The client's address: the peer's, or what trusted proxies say it is.
/// `None` only without a peer address (a router served without one).
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &TrustedProxies,
) -> Option<IpAddr> {
    let peer = peer?.ip().to_canonical();
    if !trusted.contains(peer) {
        return Some(peer);
    }
    // Several headers are one list, in order (RFC 9110 §5.3).
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let mut nearest = peer;
    for hop in hops.iter().rev() {
        // A trusted proxy writes addresses; anything else came from a client.
        let Some(ip) = parse_hop(hop) else {
            return Some(nearest);
        };
        if !trusted.contains(ip) {
            return Some(ip);
        }
        nearest = ip;
    }
    // Every hop is a proxy of ours: the farthest one is as close to the
    // client as the header gets.
    Some(nearest)
}

/// `203.0.113.7`, `2001:db8::1`, `203.0.113.7:5000` or `[2001:db8::1]:5000`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    hop.parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_peers_and_from_the_right() {
        let none = TrustedProxies::default();
        let lb: TrustedProxies = "10.0.0.0/8".parse().unwrap();
        let proxy = Some("10.0.0.9:5000".parse::<SocketAddr>().unwrap());
        let stranger = Some("198.51.100.4:5000".parse::<SocketAddr>().unwrap());
        let spoofed = xff(&["1.2.3.4, 203.0.113.7"]);
        // What, the peer, its headers, the trusted proxies, and the answer.
        type Case<'a> = (
            &'a str,
            Option<SocketAddr>,
            &'a HeaderMap,
            &'a TrustedProxies,
            Option<IpAddr>,
        );
        let cases: &[Case] = &[
            (
                "no trusted proxies: the peer",
                proxy,
                &spoofed,
                &none,
                ip("10.0.0.9"),
            ),
            (
                "untrusted peer: the peer",
                stranger,
                &spoofed,
                &lb,
                ip("198.51.100.4"),
            ),
            (
                "trusted peer: rightmost untrusted hop",
                proxy,
                &spoofed,
                &lb,
                ip("203.0.113.7"),
            ),
            (
                "trusted hops are skipped",
                proxy,
                &xff(&["1.2.3.4, 203.0.113.7, 10.1.1.1"]),
                &lb,
                ip("203.0.113.7"),
            ),
            (
                "several headers are one list",
                proxy,
                &xff(&["1.2.3.4", "203.0.113.7:4000"]),
                &lb,
                ip("203.0.113.7"),
            ),
            (
                "no header: the peer",
                proxy,
                &HeaderMap::new(),
                &lb,
                ip("10.0.0.9"),
            ),
            (
                "garbage stops the walk",
                proxy,
                &xff(&["203.0.113.7, garbage, 10.2.2.2"]),
                &lb,
                ip("10.2.2.2"),
            ),
            (
                "all trusted: the farthest",
                proxy,
                &xff(&["10.3.3.3"]),
                &lb,
                ip("10.3.3.3"),
            ),
            (
                "mapped IPv6 peers count as IPv4",
                Some("[::ffff:10.0.0.9]:1".parse().unwrap()),
                &xff(&["[2001:db8::1]:443"]),
                &lb,
                ip("2001:db8::1"),
            ),
            ("no peer: unknown", None, &spoofed, &lb, None),
        ];
        for (what, peer, headers, trusted, want) in cases {
            assert_eq!(client_ip(*peer, headers, trusted), *want, "{what}");
        }
    }
}
