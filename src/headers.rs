//! Header handling of an intermediary (RFC 9110 §7.6).

use http::header::{
    Entry, HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, DATE, PROXY_AUTHORIZATION, TE, TRAILER,
    TRANSFER_ENCODING, UPGRADE, VIA,
};
use http::Version;

pub const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// non-standard `Keep-Alive`/`Proxy-Connection` and `Proxy-Authorization`, meant for this hop).
static HOP_BY_HOP: [HeaderName; 8] = [
    CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    TE,
    TRAILER,
    TRANSFER_ENCODING,
    UPGRADE,
    PROXY_AUTHORIZATION,
];

/// RFC 9110 §7.6.1: "Intermediaries MUST parse a received Connection header field before a
/// message is forwarded and, for each connection-option in this field, remove any header or
/// trailer field(s) from the message with the same name as the connection-option, and then
/// remove the Connection header field itself (or replace it with the intermediary's own
/// control options for the forwarded message)." The fixed hop-by-hop fields go too.
///
/// Returns which `X-Forwarded-*` fields the message carries, seen on the same pass over its
/// names, for [`set_forwarded`].
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> ForwardedFields {
    // One pass over the (few) names finds which fixed hop-by-hop fields are present: most
    // messages carry none, or only `Connection`; absent ones cost no lookup.
    let mut present = [false; 8];
    let mut forwarded = ForwardedFields::default();
    // Fixed hop-by-hop fields other than `Connection` (nearly always none: no second pass).
    let mut others = false;
    for name in headers.keys() {
        match field_index(name) {
            Some(index @ 0..=7) => {
                present[index] = true;
                others |= index > 0;
            }
            Some(8) => forwarded.for_ = true,
            Some(9) => forwarded.proto = true,
            Some(10) => forwarded.host = true,
            _ => {}
        }
    }
    // `Connection` is first in HOP_BY_HOP: take its values out, then remove what they name.
    if present[0] && !remove_plain_connection(headers) {
        if let Entry::Occupied(entry) = headers.entry(CONNECTION) {
            let (_, values) = entry.remove_entry_mult();
            let values: SmallValues = values.collect();
            for value in &values {
                // Nearly always the whole value: `keep-alive` or `close`, which name nothing
                // more to remove (no split needed).
                if is_hop_option(value.as_bytes()) {
                    continue;
                }
                let Ok(value) = value.to_str() else { continue };
                for option in value.split(',').map(str::trim) {
                    // Options that name no field, or a fixed hop-by-hop one removed below.
                    if option.is_empty() || is_hop_option(option.as_bytes()) {
                        continue;
                    }
                    // A `&str` name is matched case-insensitively, without allocating.
                    headers.remove(option);
                }
            }
        }
    }
    if others {
        for (name, present) in HOP_BY_HOP.iter().zip(present).skip(1) {
            if present {
                headers.remove(name);
            }
        }
    }
    forwarded
}

/// Which of the `X-Forwarded-*` fields this proxy sets a message already carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ForwardedFields {
    pub for_: bool,
    pub proto: bool,
    pub host: bool,
}

/// Removes `Connection` if it is one field whose value is a plain option such as `keep-alive`
/// or `close` (nearly every message that has one), naming no other field: one lookup and a
/// removal, instead of taking its values out to parse them. Whether it did.
fn remove_plain_connection(headers: &mut HeaderMap) -> bool {
    let mut values = headers.get_all(CONNECTION).iter();
    let plain = matches!((values.next(), values.next()), (Some(value), None) if is_hop_option(value.as_bytes()));
    if plain {
        headers.remove(CONNECTION);
    }
    plain
}

/// `name`'s index in [`HOP_BY_HOP`].
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    field_index(name).filter(|index| *index < HOP_BY_HOP.len())
}

/// `name`'s index in [`HOP_BY_HOP`], or 8, 9, 10 for `X-Forwarded-For`, `-Proto`, `-Host`:
/// one match on the name's text (a length switch and a compare), cheaper than comparing
/// against each `HeaderName`.
fn field_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "te" => Some(3),
        "trailer" => Some(4),
        "transfer-encoding" => Some(5),
        "upgrade" => Some(6),
        "proxy-authorization" => Some(7),
        "x-forwarded-for" => Some(8),
        "x-forwarded-proto" => Some(9),
        "x-forwarded-host" => Some(10),
        _ => None,
    }
}

/// `Connection` options that need no lookup: `close` names no field, the rest are fixed
/// hop-by-hop fields (lowercase, compared case-insensitively).
const HOP_OPTIONS: [&str; 4] = ["close", "keep-alive", "te", "upgrade"];

fn is_hop_option(option: &[u8]) -> bool {
    // Nearly always exactly `keep-alive` or `close`: compared as they are first.
    option == b"keep-alive"
        || option == b"close"
        || HOP_OPTIONS
            .iter()
            .any(|known| option.eq_ignore_ascii_case(known.as_bytes()))
}

/// The values of one `Connection` field: nearly always one.
type SmallValues = smallvec::SmallVec<[HeaderValue; 2]>;

/// Whether a response field is stored for replay (docs/behaviour.md §6): end-to-end fields only, and not
/// `Date` (a replay gets a fresh one) nor the framing fields (recomputed for the stored body).
pub fn is_replayed(name: &HeaderName) -> bool {
    !(hop_by_hop_index(name).is_some() || name == DATE || name == CONTENT_LENGTH)
}

/// RFC 9110 §7.6.3: the `Via` entry this proxy adds, by the protocol version it received.
pub fn via_value(version: Version) -> HeaderValue {
    match version {
        Version::HTTP_10 => HeaderValue::from_static("1.0 idemproxy"),
        Version::HTTP_2 => HeaderValue::from_static("2 idemproxy"),
        Version::HTTP_3 => HeaderValue::from_static("3 idemproxy"),
        _ => HeaderValue::from_static("1.1 idemproxy"),
    }
}

/// Appends this proxy to `Via` (after any entries earlier hops made).
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    headers.append(VIA, via_value(version));
}

/// Sets the de-facto `X-Forwarded-*` fields: `For` gets the client's address appended to
/// what earlier proxies recorded (folded into one field); `Proto` and `Host` describe the
/// request as this proxy received it. `seen` says which the message carries already
/// ([`remove_hop_by_hop`]): an absent one is appended without looking for it first.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    seen: ForwardedFields,
    client_ip: &HeaderValue,
    proto: &HeaderValue,
    host: Option<HeaderValue>,
) {
    if !seen.for_ {
        headers.append(X_FORWARDED_FOR, client_ip.clone());
    } else {
        match headers.entry(X_FORWARDED_FOR) {
            Entry::Vacant(entry) => {
                entry.insert(client_ip.clone());
            }
            Entry::Occupied(mut entry) => {
                let forwarded_for = {
                    let parts: smallvec::SmallVec<[&[u8]; 4]> = entry.iter().map(HeaderValue::as_bytes).collect();
                    join(&parts, client_ip.as_bytes())
                };
                // Replaces every earlier value: one folded field.
                entry.insert(forwarded_for);
            }
        }
    }
    set_or_append(headers, seen.proto, X_FORWARDED_PROTO, Some(proto.clone()));
    set_or_append(headers, seen.host, X_FORWARDED_HOST, host);
}

/// Makes `value` the field's only value (none: the field goes), looking it up only when the
/// message carries it (`present`).
fn set_or_append(headers: &mut HeaderMap, present: bool, name: HeaderName, value: Option<HeaderValue>) {
    match (present, value) {
        (true, Some(value)) => {
            headers.insert(name, value);
        }
        (true, None) => {
            headers.remove(name);
        }
        (false, Some(value)) => {
            headers.append(name, value);
        }
        (false, None) => {}
    }
}

/// The retry hint (docs/behaviour.md §16): `name: true` when a retry with the same key can
/// get a different answer, `name: false` when it cannot. Nothing when the route names no
/// header. Replaces a value the upstream set: the proxy knows what a retry will get.
pub fn set_retry_hint(headers: &mut HeaderMap, name: Option<&HeaderName>, retry: bool) {
    if let Some(name) = name {
        let value = HeaderValue::from_static(if retry { "true" } else { "false" });
        headers.insert(name.clone(), value);
    }
}

fn join(parts: &[&[u8]], last: &[u8]) -> HeaderValue {
    let mut out = Vec::with_capacity(parts.iter().map(|p| p.len() + 2).sum::<usize>() + last.len());
    for part in parts {
        out.extend_from_slice(part);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(last);
    // Made only of valid header values and ", ": still a valid value.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field names left after [`remove_hop_by_hop`] on a message with `fields`, sorted.
    fn kept_after_removal(fields: &[(&'static str, &'static str)]) -> Vec<String> {
        let mut headers = HeaderMap::new();
        for (name, value) in fields {
            headers.append(*name, HeaderValue::from_static(value));
        }
        remove_hop_by_hop(&mut headers);
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn removes_hop_by_hop_and_connection_options() {
        let kept = kept_after_removal(&[
            ("connection", "keep-alive, X-Secret , close"),
            ("connection", "x-other"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("x-kept", "1"),
        ]);
        assert_eq!(kept, vec!["x-kept"]);
    }

    #[test]
    fn hop_by_hop_index_matches_the_list() {
        for (index, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name), Some(index), "{name}");
        }
        assert_eq!(hop_by_hop_index(&http::header::CONTENT_TYPE), None);
    }

    #[test]
    fn connection_close_alone_goes_and_the_rest_stays() {
        let kept = kept_after_removal(&[
            ("connection", "Close, Keep-Alive, x-absent"),
            ("content-type", "text/plain"),
            ("x-kept", "1"),
        ]);
        assert_eq!(kept, vec!["content-type", "x-kept"]);
    }

    #[test]
    fn fixed_hop_by_hop_fields_go_without_connection() {
        let kept = kept_after_removal(&[
            ("transfer-encoding", "chunked"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
        ]);
        assert_eq!(kept, vec!["x-kept"]);
    }

    #[test]
    fn x_forwarded_for_appends_and_folds() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let proto = HeaderValue::from_static("http");
        let mut headers = HeaderMap::new();
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("1.1.1.1"));
        headers.append(X_FORWARDED_FOR, HeaderValue::from_static("2.2.2.2, 3.3.3.3"));
        headers.append(X_FORWARDED_PROTO, HeaderValue::from_static("spoofed"));
        let seen = remove_hop_by_hop(&mut headers);
        assert_eq!(
            seen,
            ForwardedFields {
                for_: true,
                proto: true,
                host: false
            }
        );
        set_forwarded(
            &mut headers,
            seen,
            &ip,
            &proto,
            Some(HeaderValue::from_static("api.example")),
        );
        assert_eq!(headers[X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.9");
        assert_eq!(headers.get_all(X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(headers[X_FORWARDED_HOST], "api.example");
        assert_eq!(headers.get_all(X_FORWARDED_PROTO).iter().collect::<Vec<_>>(), ["http"]);
        let mut fresh = HeaderMap::new();
        let seen = remove_hop_by_hop(&mut fresh);
        assert_eq!(seen, ForwardedFields::default());
        set_forwarded(&mut fresh, seen, &ip, &proto, None);
        assert_eq!(fresh[X_FORWARDED_FOR], "10.0.0.9");
        assert_eq!(fresh[X_FORWARDED_PROTO], "http");
        assert!(!fresh.contains_key(X_FORWARDED_HOST));
    }

    #[test]
    fn retry_hint_is_set_only_when_named_and_replaces_the_upstreams() {
        let name = HeaderName::from_static("stripe-should-retry");
        let mut headers = HeaderMap::new();
        set_retry_hint(&mut headers, None, false);
        assert!(headers.is_empty());
        headers.insert(name.clone(), HeaderValue::from_static("true"));
        set_retry_hint(&mut headers, Some(&name), false);
        assert_eq!(headers.get_all(&name).iter().collect::<Vec<_>>(), ["false"]);
    }

    #[test]
    fn replayed_fields_exclude_date_and_framing() {
        assert!(!is_replayed(&DATE));
        assert!(!is_replayed(&CONTENT_LENGTH));
        assert!(!is_replayed(&TRANSFER_ENCODING));
        assert!(is_replayed(&http::header::CONTENT_TYPE));
        assert!(is_replayed(&http::header::LOCATION));
    }
}
