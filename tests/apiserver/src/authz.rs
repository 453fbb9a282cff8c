//! Authorisation as the API server's RBAC decides it, for what tests need:
//! the verb a request is checked as (the API server's request-info rules)
//! and a role that grants verbs on resources.
//!
//! Port-forward is the case that matters: a WebSocket upgrade is a GET and
//! is checked as `get` on `pods/portforward`; from Kubernetes 1.35
//! (`AuthorizePodWebsocketUpgradeCreatePermission`, on by default) `create`
//! is checked as well. kubectl's SPDY upgrade is a POST: `create` only.

use std::collections::HashSet;

use axum::http::Method;

/// Who may do what. The default allows everything.
#[derive(Debug, Default)]
pub struct Authz {
    /// Resources refused whatever the verb (`deny`).
    denied: HashSet<String>,
    /// When set, only what a rule grants is allowed.
    role: Option<Vec<Rule>>,
    /// 1.35: WebSocket upgrades of pods/portforward, exec, attach also need `create`.
    websocket_create_check: bool,
}

#[derive(Debug, Clone)]
struct Rule {
    resource: String,
    verbs: Vec<String>,
}

impl Authz {
    pub fn deny(&mut self, resource: &str) {
        self.denied.insert(resource.to_string());
    }

    pub fn allow(&mut self, resource: &str) {
        self.denied.remove(resource);
    }

    /// `None`: everything allowed. Otherwise `(resource, verbs)` rules, e.g.
    /// `("pods/portforward", &["create"])`; `"*"` as a verb grants all verbs.
    pub fn set_role(&mut self, rules: Option<&[(&str, &[&str])]>) {
        self.role = rules.map(|rules| {
            rules
                .iter()
                .map(|(resource, verbs)| Rule {
                    resource: resource.to_string(),
                    verbs: verbs.iter().map(|v| v.to_string()).collect(),
                })
                .collect()
        });
    }

    pub fn set_websocket_create_check(&mut self, on: bool) {
        self.websocket_create_check = on;
    }

    fn allows(&self, resource: &str, verb: &str) -> bool {
        if self.denied.contains(resource) {
            return false;
        }
        match &self.role {
            None => true,
            Some(rules) => rules
                .iter()
                .any(|r| r.resource == resource && r.verbs.iter().any(|v| v == verb || v == "*")),
        }
    }

    /// The first verb of `needed` that is not granted on `resource`.
    pub fn refused<'a>(&self, resource: &str, needed: &[&'a str]) -> Option<&'a str> {
        needed.iter().copied().find(|v| !self.allows(resource, v))
    }

    /// The verbs a request is checked as.
    pub fn verbs(&self, req: &RequestKind) -> Vec<&'static str> {
        let verb = match (&req.method, req.named) {
            (m, true) if m == Method::GET => "get",
            (m, false) if m == Method::GET && req.watch => "watch",
            (m, false) if m == Method::GET => "list",
            (m, _) if m == Method::POST => "create",
            (m, _) if m == Method::PUT => "update",
            (m, _) if m == Method::PATCH => "patch",
            (m, true) if m == Method::DELETE => "delete",
            (m, false) if m == Method::DELETE => "deletecollection",
            _ => "get",
        };
        let mut verbs = vec![verb];
        if req.websocket && self.websocket_create_check && verb == "get" && req.streaming {
            verbs.push("create");
        }
        verbs
    }
}

/// What the verb of a request depends on.
pub struct RequestKind {
    pub method: Method,
    /// A request for one named object (or its subresource).
    pub named: bool,
    /// `?watch=true`.
    pub watch: bool,
    /// An `Upgrade: websocket` request.
    pub websocket: bool,
    /// `pods/portforward`, `pods/exec` or `pods/attach`.
    pub streaming: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(method: Method, websocket: bool) -> RequestKind {
        RequestKind {
            method,
            named: true,
            watch: false,
            websocket,
            streaming: true,
        }
    }

    #[test]
    fn port_forward_verbs_follow_the_transport_and_the_release() {
        let mut a = Authz::default();
        assert_eq!(a.verbs(&kind(Method::GET, true)), vec!["get"]);
        assert_eq!(a.verbs(&kind(Method::POST, false)), vec!["create"]);
        a.set_websocket_create_check(true);
        assert_eq!(a.verbs(&kind(Method::GET, true)), vec!["get", "create"]);
        assert_eq!(a.verbs(&kind(Method::POST, false)), vec!["create"]);
    }

    #[test]
    fn a_role_grants_only_its_verbs() {
        let mut a = Authz::default();
        assert_eq!(a.refused("pods/portforward", &["get"]), None);
        a.set_role(Some(&[
            ("pods", &["get", "list"][..]),
            ("pods/portforward", &["create"][..]),
        ]));
        assert_eq!(a.refused("pods/portforward", &["get"]), Some("get"));
        assert_eq!(a.refused("pods/portforward", &["create"]), None);
        assert_eq!(a.refused("pods", &["list", "get"]), None);
        assert_eq!(a.refused("pods", &["watch"]), Some("watch"));
        assert_eq!(a.refused("services", &["get"]), Some("get"));
        a.deny("pods");
        assert_eq!(a.refused("pods", &["get"]), Some("get"));
        a.set_role(None);
        a.allow("pods");
        assert_eq!(a.refused("services", &["delete"]), None);
    }
}
