//! `redis+sentinel://` URLs (docs/behaviour.md §4.4), parsed once here for `--check-config` and
//! for the store alike:
//!
//! `redis+sentinel://[user:password@]h1:p1,h2:p2,.../<master-name>[/<db>]`, and
//! `rediss+sentinel://…` for TLS to the sentinels and to the Redis nodes. The user information
//! is the Redis nodes' (percent-encoded as in any URL); a port left out is Sentinel's 26379.
//! Error messages never quote the URL: it may hold a password.

use std::fmt;

use percent_encoding::percent_decode_str;

/// The port a sentinel listens on when the URL names none.
pub const SENTINEL_PORT: u16 = 26379;

/// A parsed Sentinel URL.
#[derive(Clone, PartialEq, Eq)]
pub struct SentinelUrl {
    /// `rediss+sentinel://`: TLS to the sentinels and to the nodes.
    pub tls: bool,
    /// The sentinels, in the URL's order.
    pub sentinels: Vec<(String, u16)>,
    /// The name the sentinels monitor the master under.
    pub master_name: String,
    pub db: i64,
    /// Credentials of the Redis nodes (not of the sentinels).
    pub username: Option<String>,
    pub password: Option<String>,
}

impl fmt::Debug for SentinelUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SentinelUrl")
            .field("tls", &self.tls)
            .field("sentinels", &self.sentinels)
            .field("master_name", &self.master_name)
            .field("db", &self.db)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .finish()
    }
}

impl SentinelUrl {
    /// `None` when `url` is not a Sentinel URL; otherwise the parsed URL, or why it cannot be used.
    pub fn parse(url: &str) -> Option<Result<Self, String>> {
        let (tls, rest) = match url.strip_prefix("redis+sentinel://") {
            Some(rest) => (false, rest),
            None => (true, url.strip_prefix("rediss+sentinel://")?),
        };
        Some(Self::parse_rest(tls, rest))
    }

    /// Whether `url` is meant as a Sentinel URL (its scheme), whether or not it parses.
    pub fn is_sentinel(url: &str) -> bool {
        url.starts_with("redis+sentinel://") || url.starts_with("rediss+sentinel://")
    }

    fn parse_rest(tls: bool, rest: &str) -> Result<Self, String> {
        if rest.contains(['?', '#']) {
            return Err("a Sentinel URL takes no query or fragment".to_owned());
        }
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let (userinfo, hosts) = match authority.rfind('@') {
            Some(at) => (Some(&authority[..at]), &authority[at + 1..]),
            None => (None, authority),
        };
        let (username, password) = credentials(userinfo)?;
        let sentinels = hosts
            .split(',')
            .enumerate()
            .map(|(i, host)| host_port(host).map_err(|why| format!("sentinel {} of the list {why}", i + 1)))
            .collect::<Result<Vec<_>, _>>()?;
        let (master_name, db) = master_and_db(path)?;
        Ok(Self {
            tls,
            sentinels,
            master_name,
            db,
            username,
            password,
        })
    }
}

/// `user:password` → both percent-decoded; empty parts are absent.
fn credentials(userinfo: Option<&str>) -> Result<(Option<String>, Option<String>), String> {
    let Some(userinfo) = userinfo else {
        return Ok((None, None));
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let decode = |part: &str, what: &str| {
        percent_decode_str(part)
            .decode_utf8()
            .map(|s| (!s.is_empty()).then(|| s.into_owned()))
            .map_err(|_| format!("the {what} is not valid percent-encoded UTF-8"))
    };
    Ok((decode(user, "user name")?, decode(password, "password")?))
}

/// `host[:port]` or `[v6]:port`; the port defaults to [`SENTINEL_PORT`].
fn host_port(text: &str) -> Result<(String, u16), String> {
    let (host, port) = if let Some(v6) = text.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("has an unclosed `[`")?;
        (host, after.strip_prefix(':'))
    } else {
        match text.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (text, None),
        }
    };
    if host.is_empty() {
        return Err("has no host".to_owned());
    }
    let port = match port {
        None => SENTINEL_PORT,
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or("has a port that is not a number from 1 to 65535")?,
    };
    Ok((host.to_owned(), port))
}

/// `<master-name>[/<db>]`.
fn master_and_db(path: &str) -> Result<(String, i64), String> {
    let (name, db) = path.split_once('/').unwrap_or((path, ""));
    let name = percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| "the master name is not valid percent-encoded UTF-8".to_owned())?;
    if name.is_empty() {
        return Err("names no master: expected redis+sentinel://host:port,.../<master-name>[/<db>]".to_owned());
    }
    let db = match db.trim_end_matches('/') {
        "" => 0,
        db => db
            .parse::<i64>()
            .ok()
            .filter(|db| *db >= 0)
            .ok_or("has a database that is not a number")?,
    };
    Ok((name.into_owned(), db))
}

/// `url` with the password of its user information replaced by `***`, for logs:
/// `redis://user:secret@host:6379/0` → `redis://user:***@host:6379/0`.
pub fn redacted_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_owned();
    };
    let user = match rest[..at].split_once(':') {
        Some((user, _password)) => format!("{user}:***"),
        None => rest[..at].to_owned(),
    };
    format!("{scheme}://{user}@{}", &rest[at + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_logged_without_their_password() {
        assert_eq!(
            redacted_url("redis://user:s3cret@h:6379/0"),
            "redis://user:***@h:6379/0"
        );
        assert_eq!(redacted_url("rediss://:s3cret@h:6380"), "rediss://:***@h:6380");
        assert_eq!(redacted_url("redis://h:6379"), "redis://h:6379");
        assert_eq!(redacted_url("redis+cluster://a:1,b:2"), "redis+cluster://a:1,b:2");
        assert_eq!(redacted_url("redis://u:p@ss@h:1/2"), "redis://u:***@h:1/2");
        assert_eq!(
            redacted_url("rediss+sentinel://app:s3cret@s1:26379,s2:26379/orders/1"),
            "rediss+sentinel://app:***@s1:26379,s2:26379/orders/1"
        );
    }

    fn parsed(url: &str) -> SentinelUrl {
        match SentinelUrl::parse(url) {
            Some(Ok(parsed)) => parsed,
            other => panic!("{url}: {other:?}"),
        }
    }

    fn refused(url: &str) -> String {
        match SentinelUrl::parse(url) {
            Some(Err(why)) => why,
            other => panic!("{url} should be refused: {other:?}"),
        }
    }

    #[test]
    fn a_full_url_parses_into_its_parts() {
        let url = parsed("rediss+sentinel://app:p%40ss:w@s1.internal:26380,[::1]:5000,s3/orders/2");
        assert_eq!(
            url,
            SentinelUrl {
                tls: true,
                sentinels: vec![
                    ("s1.internal".into(), 26380),
                    ("::1".into(), 5000),
                    ("s3".into(), SENTINEL_PORT)
                ],
                master_name: "orders".into(),
                db: 2,
                username: Some("app".into()),
                password: Some("p@ss:w".into()),
            }
        );
        assert!(!format!("{url:?}").contains("p@ss"), "{url:?}");
    }

    #[test]
    fn a_minimal_url_takes_the_defaults() {
        let url = parsed("redis+sentinel://127.0.0.1:26379/mymaster");
        assert!(!url.tls);
        assert_eq!(url.sentinels, vec![("127.0.0.1".to_owned(), 26379)]);
        assert_eq!((url.master_name.as_str(), url.db), ("mymaster", 0));
        assert_eq!((url.username, url.password), (None, None));
        assert_eq!(parsed("redis+sentinel://:pw@h/m/").password.as_deref(), Some("pw"));
        assert_eq!(parsed("redis+sentinel://:pw@h/m/").username, None);
    }

    #[test]
    fn other_schemes_are_not_sentinel_urls() {
        for url in ["redis://h:1", "redis+cluster://a:1,b:2", "sentinel://h/m"] {
            assert!(SentinelUrl::parse(url).is_none(), "{url}");
            assert!(!SentinelUrl::is_sentinel(url), "{url}");
        }
        assert!(SentinelUrl::is_sentinel("rediss+sentinel://"));
    }

    #[test]
    fn malformed_urls_say_why_without_quoting_the_password() {
        for (url, why) in [
            ("redis+sentinel://:s3cret@h:1", "names no master"),
            ("redis+sentinel://:s3cret@h:1/", "names no master"),
            (
                "redis+sentinel://:s3cret@h:1,:2/m",
                "sentinel 2 of the list has no host",
            ),
            ("redis+sentinel://:s3cret@h:port/m", "sentinel 1 of the list has a port"),
            ("redis+sentinel://:s3cret@h:0/m", "has a port"),
            ("redis+sentinel://:s3cret@h:1,/m", "sentinel 2 of the list has no host"),
            ("redis+sentinel://:s3cret@[::1/m", "unclosed"),
            ("redis+sentinel://:s3cret@h:1/m/zero", "database"),
            ("redis+sentinel://:s3cret@h:1/m/-1", "database"),
            ("redis+sentinel://:s3cret@h:1/m?db=1", "no query"),
            ("redis+sentinel://:s3cret%ff@h:1/m", "password"),
        ] {
            let err = refused(url);
            assert!(err.contains(why), "{url}: {err}");
            assert!(!err.contains("s3cret"), "{url}: {err}");
        }
    }
}
