//! Credentials never reach a log line, an error or a `Debug` output: URLs and client settings are shown
//! with passwords, secrets and tokens replaced by `***`.

/// Whether a setting's value is a credential (`sasl.password`, `ssl.key.password`, `sasl.oauthbearer.
/// client.secret`, a token...).
pub(crate) fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "credential"]
        .iter()
        .any(|w| key.contains(w))
}

/// `url` with the password of its user info and every secret query value replaced by `***`.
///
/// `amqp://guest:guest@host:5672/%2f` shows as `amqp://guest:***@host:5672/%2f`;
/// `kafka://h:9092?sasl.password=x` as `kafka://h:9092?sasl.password=***`.
pub(crate) fn url(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((s, r)) => (Some(s), r),
        None => (None, url),
    };
    let (before_query, query) = match rest.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (rest, None),
    };
    // The user info ends at the last '@' before the path.
    let authority_end = before_query.find('/').unwrap_or(before_query.len());
    let mut shown = String::with_capacity(url.len());
    if let Some(s) = scheme {
        shown.push_str(s);
        shown.push_str("://");
    }
    match before_query[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => {
            match userinfo.split_once(':') {
                Some((user, _)) => {
                    shown.push_str(user);
                    shown.push_str(":***");
                }
                None => shown.push_str(userinfo),
            }
            shown.push('@');
            shown.push_str(host);
            shown.push_str(&before_query[authority_end..]);
        }
        None => shown.push_str(before_query),
    }
    if let Some(q) = query {
        shown.push('?');
        let pairs: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if is_secret(k) => format!("{k}=***"),
                _ => kv.to_owned(),
            })
            .collect();
        shown.push_str(&pairs.join("&"));
    }
    shown
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_and_secret_settings_are_hidden_and_the_rest_kept() {
        assert_eq!(
            super::url("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:***@127.0.0.1:5672/%2f"
        );
        assert_eq!(
            super::url("kafka://h:9092?security.protocol=sasl_ssl&sasl.password=hunter2&sasl.username=me"),
            "kafka://h:9092?security.protocol=sasl_ssl&sasl.password=***&sasl.username=me"
        );
        assert_eq!(super::url("memory://?partitions=4"), "memory://?partitions=4");
        assert_eq!(super::url("amqp://user@host/vhost"), "amqp://user@host/vhost");
        assert_eq!(
            super::url("amqp://u:p%40ss@host:1/v?token=abc"),
            "amqp://u:***@host:1/v?token=***"
        );
    }
}
