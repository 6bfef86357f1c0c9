//! Identity templates: text with `{subject}`, `{claim:NAME}` and
//! `{cert:FIELD}` placeholders, filled from an identity — in discovery
//! lookups, allow rules (`tcp://db-{claim:tenant}:5432`) and the agent ids
//! an identity may register (`{cert:cn}`).
//!
//! A value goes into a template only when it is a plain name: 1–128 of
//! `A-Z a-z 0-9 . _ -` (and `@` for emails), not starting with `.`. A claim
//! of `*`, `../x` or `a:1, tcp://*` cannot widen a rule or leave a folder:
//! the template then yields nothing, and what it would have allowed is not
//! allowed.

/// Checks a template's placeholders.
pub fn check(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed `{{` in `{template}`"))?;
        let ph = &rest[open + 1..open + close];
        if !placeholder_ok(ph) {
            return Err(format!(
                "unknown placeholder `{{{ph}}}` in `{template}` (expected {{subject}}, \
                 {{claim:NAME}} or {{cert:cn|dns|uri|email}})"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    Ok(())
}

/// Whether `ph` (without braces) is an identity placeholder.
pub fn placeholder_ok(ph: &str) -> bool {
    ph == "subject"
        || ph
            .strip_prefix("claim:")
            .is_some_and(|n| !n.is_empty() && n.len() <= 64 && !n.contains(['{', '}']))
        || ph
            .strip_prefix("cert:")
            .is_some_and(|f| crate::cert::FIELDS.contains(&f))
}

/// Whether a value may go into a template.
pub fn safe_value(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'))
}

/// Fills a template: `lookup` gives a placeholder's value (`subject`,
/// `claim:NAME`, `cert:FIELD`); `None` when one has none or an unsafe one.
/// Text outside placeholders is kept as it is.
pub fn expand(template: &str, lookup: impl Fn(&str) -> Option<String>) -> Option<String> {
    let mut out = String::with_capacity(template.len() + 16);
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = open + rest[open..].find('}')?;
        let ph = &rest[open + 1..close];
        let v = lookup(ph)?;
        if !safe_value(&v) {
            return None;
        }
        out.push_str(&v);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_fill_only_with_plain_names() {
        let look = |ph: &str| match ph {
            "subject" => Some("ada".to_string()),
            "claim:tenant" => Some("t1".to_string()),
            "claim:evil" => Some("*".to_string()),
            "claim:dots" => Some("../etc".to_string()),
            "cert:cn" => Some("agent-1".to_string()),
            _ => None,
        };
        assert_eq!(
            expand("tcp://db-{claim:tenant}:5432", look).as_deref(),
            Some("tcp://db-t1:5432")
        );
        assert_eq!(expand("{cert:cn}", look).as_deref(), Some("agent-1"));
        assert_eq!(expand("{subject}-*", look).as_deref(), Some("ada-*"));
        assert_eq!(expand("tcp://{claim:evil}:1", look), None);
        assert_eq!(expand("{claim:dots}", look), None);
        assert_eq!(expand("{claim:missing}", look), None);
        assert!(check("tcp://db-{claim:tenant}:5432").is_ok());
        assert!(check("{cert:cn}").is_ok());
        assert!(check("{cert:serial}").is_err());
        assert!(check("{path}").is_err());
        assert!(check("{claim:").is_err());
    }
}
