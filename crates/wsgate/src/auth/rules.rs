//! Identity rules: templated patterns (`tcp://db-{claim:tenant}:5432`,
//! `{cert:cn}`) filled from an identity when a request or stream opens. A
//! template whose placeholder the identity cannot fill with a plain name
//! allows nothing (see `wsgate_auth::template`).

use wsgate_tunnel::allow::AllowList;

use super::Identity;

/// A list of templated rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules(pub Vec<String>);

impl Rules {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The rules as `identity` fills them (those it cannot fill left out).
    pub fn expand(&self, identity: &Identity) -> Vec<String> {
        self.0.iter().filter_map(|t| identity.expand(t)).collect()
    }

    /// The rules as destination allow patterns (the tunnel's streams);
    /// `None` when there are no rules (nothing more to check).
    pub fn allow_list(&self, identity: &Identity) -> Option<AllowList> {
        if self.is_empty() {
            return None;
        }
        let filled = self.expand(identity);
        // A filled rule that does not parse allows nothing.
        Some(AllowList(
            filled.iter().filter_map(|p| p.parse().ok()).collect(),
        ))
    }

    /// Whether `s` matches a filled rule as a glob (bridge peers, agent ids).
    pub fn permits_glob(&self, identity: &Identity, s: &str) -> bool {
        self.expand(identity)
            .iter()
            .any(|g| wsgate_tunnel::allow::glob(g, s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fill_per_identity() {
        let r = Rules(vec![
            "tcp://db-{claim:tenant}:5432".into(),
            "{cert:cn}".into(),
        ]);
        let mut id = Identity::subject("ada");
        id.attributes.push(("claim:tenant".into(), "t1".into()));
        assert_eq!(r.expand(&id), vec!["tcp://db-t1:5432".to_string()]);
        let l = r.allow_list(&id).unwrap();
        assert!(l.permits(&"tcp://db-t1:5432".parse().unwrap(), None));
        assert!(!l.permits(&"tcp://db-t2:5432".parse().unwrap(), None));
        let mut evil = Identity::subject("eve");
        evil.attributes.push(("claim:tenant".into(), "*".into()));
        assert!(r.expand(&evil).is_empty());
        assert!(Rules::default().allow_list(&id).is_none());
        let ids = Rules(vec!["{subject}-*".into()]);
        assert!(ids.permits_glob(&id, "ada-1"));
        assert!(!ids.permits_glob(&id, "bob-1"));
    }
}
