//! Parsing `iptables-save` output: our chains, our jump rules, and the
//! frontends and backends they program (for `kproxy status`).

use std::collections::HashMap;

use super::names::*;
use crate::dataplane::ProgrammedFrontend;

/// One parsed `-A CHAIN …` line (only the fields we need).
#[derive(Debug, Default, Clone)]
struct Rule {
    src: Option<String>,
    dst: Option<String>,
    proto: Option<String>,
    dport: Option<String>,
    comment: Option<String>,
    src_type_local: bool,
    dst_type_local: bool,
    target: Option<String>,
    to_destination: Option<String>,
}

/// Splits a save line into words, honouring double quotes and backslashes.
pub(crate) fn tokenize(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    has_word = true;
                }
            }
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut cur));
                    has_word = false;
                }
            }
            c => {
                cur.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(cur);
    }
    words
}

fn parse_rule(words: &[String]) -> Rule {
    let mut r = Rule::default();
    let mut i = 0;
    let mut negate = false;
    while i < words.len() {
        let w = words[i].as_str();
        let next = words.get(i + 1).cloned();
        match w {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-s" if !negate => r.src = next,
            "-d" if !negate => r.dst = next,
            "-p" => r.proto = next,
            "--dport" => r.dport = next,
            "--comment" => r.comment = next,
            "--src-type" => r.src_type_local = next.as_deref() == Some("LOCAL"),
            "--dst-type" => r.dst_type_local = next.as_deref() == Some("LOCAL"),
            "-j" => r.target = next,
            "--to-destination" => r.to_destination = next,
            _ => {}
        }
        negate = false;
        i += 1;
    }
    r
}

/// One table of a save dump: chain declarations and rules per chain.
#[derive(Debug, Default)]
pub struct Table {
    /// Every chain declared (`:NAME`), in order.
    pub chains: Vec<String>,
    rules: HashMap<String, Vec<Rule>>,
    /// Raw `-A` lines of built-in chains that jump to a KPROXY-* chain.
    pub jump_lines: Vec<String>,
}

impl Table {
    pub fn parse(dump: &str) -> Table {
        let mut t = Table::default();
        for line in dump.lines() {
            if let Some(decl) = line.strip_prefix(':') {
                if let Some(name) = decl.split_whitespace().next() {
                    t.chains.push(name.to_string());
                }
            } else if line.starts_with("-A ") {
                let words = tokenize(line);
                let Some(chain) = words.get(1) else { continue };
                let rule = parse_rule(&words[2..]);
                if !chain.starts_with(PREFIX)
                    && rule
                        .target
                        .as_deref()
                        .is_some_and(|t| t.starts_with(PREFIX))
                {
                    t.jump_lines.push(line.to_string());
                }
                t.rules.entry(chain.clone()).or_default().push(rule);
            }
        }
        t
    }

    /// Chains with our prefix.
    pub fn our_chains(&self) -> Vec<String> {
        self.chains
            .iter()
            .filter(|c| c.starts_with(PREFIX))
            .cloned()
            .collect()
    }

    fn rules(&self, chain: &str) -> &[Rule] {
        self.rules.get(chain).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Backends reached from an SVC/SVL/EXT/FW chain, in programmed order.
    fn backends(&self, chain: &str, depth: usize) -> Vec<String> {
        if depth > 4 {
            return Vec::new();
        }
        if chain.starts_with(SVC) || chain.starts_with(SVL) {
            let mut seps: Vec<&str> = Vec::new();
            for r in self.rules(chain) {
                if let Some(t) = r.target.as_deref().filter(|t| t.starts_with(SEP)) {
                    if !seps.contains(&t) {
                        seps.push(t);
                    }
                }
            }
            return seps
                .into_iter()
                .filter_map(|sep| {
                    self.rules(sep)
                        .iter()
                        .find_map(|r| r.to_destination.clone())
                })
                .collect();
        }
        if chain.starts_with(EXT) {
            // The rule that sends "everything else" (no source match) onwards.
            let next = self.rules(chain).iter().find_map(|r| {
                let t = r.target.as_deref()?;
                let unconditional = r.src.is_none() && !r.src_type_local;
                (unconditional && (t.starts_with(SVC) || t.starts_with(SVL))).then_some(t)
            });
            return next
                .map(|t| self.backends(t, depth + 1))
                .unwrap_or_default();
        }
        if chain.starts_with(FW) {
            let next = self
                .rules(chain)
                .iter()
                .find_map(|r| r.target.as_deref().filter(|t| t.starts_with(EXT)));
            return next
                .map(|t| self.backends(t, depth + 1))
                .unwrap_or_default();
        }
        Vec::new()
    }
}

/// `(service, kind)` from a comment such as `ns/name:port cluster IP …`.
fn service_and_kind(comment: &str) -> Option<(String, &'static str)> {
    let (service, rest) = comment.split_once(' ')?;
    let kind = if rest.starts_with("cluster IP") {
        "ClusterIP"
    } else if rest.starts_with("external IP") {
        "ExternalIP"
    } else if rest.starts_with("loadbalancer IP") {
        "LoadBalancer"
    } else if rest.starts_with("node port") {
        "NodePort"
    } else {
        return None;
    };
    Some((service.to_string(), kind))
}

fn frontend(rule: &Rule) -> Option<String> {
    let proto = rule.proto.as_deref()?;
    let port = rule.dport.as_deref()?;
    let addr = match rule.dst.as_deref() {
        Some(d) => d.strip_suffix("/32").unwrap_or(d).to_string(),
        None => "*".to_string(),
    };
    Some(format!("{addr}:{port}/{proto}"))
}

/// Frontends programmed in the given nat and filter dumps.
pub fn programmed(nat: &str, filter: &str) -> Vec<ProgrammedFrontend> {
    let nat = Table::parse(nat);
    let filter = Table::parse(filter);
    let mut out = Vec::new();
    for r in nat.rules(SERVICES).iter().chain(nat.rules(NODEPORTS)) {
        let (Some(comment), Some(target)) = (&r.comment, &r.target) else {
            continue;
        };
        let Some((service, kind)) = service_and_kind(comment) else {
            continue;
        };
        let Some(frontend) = frontend(r) else {
            continue;
        };
        out.push(ProgrammedFrontend {
            service,
            kind: kind.to_string(),
            frontend,
            backends: nat.backends(target, 0),
        });
    }
    for chain in [SERVICES, EXTERNAL_SERVICES] {
        for r in filter.rules(chain) {
            let Some(comment) = &r.comment else { continue };
            let Some((service, kind)) = service_and_kind(comment) else {
                continue;
            };
            let Some(frontend) = frontend(r) else {
                continue;
            };
            out.push(ProgrammedFrontend {
                service,
                kind: kind.to_string(),
                frontend,
                backends: Vec::new(),
            });
        }
    }
    out.sort_by(|a, b| (&a.service, &a.kind, &a.frontend).cmp(&(&b.service, &b.kind, &b.frontend)));
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenize_handles_quotes() {
        let w = tokenize(r#"-A X -m comment --comment "a b\"c" -j Y"#);
        assert_eq!(
            w,
            vec!["-A", "X", "-m", "comment", "--comment", "a b\"c", "-j", "Y"]
        );
        assert_eq!(tokenize(r#"--comment """#), vec!["--comment", ""]);
    }
}
