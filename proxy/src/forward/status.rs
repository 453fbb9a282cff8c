//! The status of each forward of `kproxy forward -f`: one line per forward,
//! redrawn in place on a terminal, printed as a plain line on every change
//! otherwise. Rendering is pure (states in, text out).

use std::fmt;

/// Where a forward is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Checking the target and binding its ports.
    Starting,
    /// Serving; the `Forwarding from` descriptions of its sockets, and the
    /// pod it goes to.
    Up { listening: Vec<String>, pod: String },
    /// No pod to forward to right now; new connections wait.
    Waiting(String),
    /// The API server cannot be reached; retrying.
    Reconnecting(String),
    /// Failed (bad target, port in use, gone for good...); retried after a pause.
    Error(String),
}

impl State {
    fn word(&self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Up { .. } => "up",
            State::Waiting(_) => "waiting",
            State::Reconnecting(_) => "reconnecting",
            State::Error(_) => "error",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Starting => write!(f, "[starting]"),
            State::Up { listening, pod } => {
                write!(f, "[up] {} (pod {pod})", listening.join(", "))
            }
            State::Waiting(why) | State::Reconnecting(why) | State::Error(why) => {
                write!(f, "[{}] {why}", self.word())
            }
        }
    }
}

/// The line of forward `name` in `state`.
pub fn line(name: &str, state: &State) -> String {
    format!("{name}: {state}")
}

/// What to write to show `states` on a terminal, given that the previous
/// drawing took `previous` lines: move up over them, then rewrite every
/// line (clearing what was there).
pub fn redraw(previous: usize, states: &[(String, State)], width: usize) -> String {
    let mut out = String::new();
    if previous > 0 {
        out.push_str(&format!("\x1b[{previous}A"));
    }
    for (name, state) in states {
        let mut l = line(name, state);
        if width > 1 && l.chars().count() > width - 1 {
            l = l.chars().take(width - 2).collect::<String>() + "…";
        }
        out.push_str("\r\x1b[2K");
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// The terminal's width (80 when it cannot be told).
pub fn terminal_width() -> usize {
    // SAFETY: TIOCGWINSZ fills a winsize struct we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        if libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) == 0 && ws.ws_col > 0 {
            return ws.ws_col as usize;
        }
    }
    80
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states() -> Vec<(String, State)> {
        vec![
            (
                "svc/api -n prod".into(),
                State::Up {
                    listening: vec!["127.0.0.1:8080 -> 80".into()],
                    pod: "api-1".into(),
                },
            ),
            (
                "pod/db".into(),
                State::Error(
                    "pod \"db\" in namespace \"default\" not found; retrying in 2s".into(),
                ),
            ),
        ]
    }

    #[test]
    fn lines_say_the_state_first() {
        let s = states();
        assert_eq!(
            line(&s[0].0, &s[0].1),
            "svc/api -n prod: [up] 127.0.0.1:8080 -> 80 (pod api-1)"
        );
        assert_eq!(
            line(&s[1].0, &s[1].1),
            "pod/db: [error] pod \"db\" in namespace \"default\" not found; retrying in 2s"
        );
        assert_eq!(
            line("x", &State::Waiting("no ready pod".into())),
            "x: [waiting] no ready pod"
        );
    }

    #[test]
    fn redraw_moves_up_and_rewrites_in_place() {
        let s = states();
        let first = redraw(0, &s, 200);
        assert!(!first.contains("\x1b[2A"));
        assert_eq!(first.matches("\r\x1b[2K").count(), 2);
        let again = redraw(2, &s, 200);
        assert!(again.starts_with("\x1b[2A\r\x1b[2Ksvc/api -n prod: [up]"));
        assert_eq!(again.matches('\n').count(), 2);
        // Long lines are cut to the width (a wrapped line would break the count).
        let narrow = redraw(0, &s, 20);
        for l in narrow.lines() {
            assert!(
                l.trim_start_matches("\r\x1b[2K").chars().count() <= 19,
                "{l:?}"
            );
        }
    }
}
