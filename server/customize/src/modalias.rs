//! Which kernel module drives a device: the `alias PATTERN MODULE` lines of a kernel's
//! `modules.alias` (and `modules.builtin.modalias`) matched against a device's modalias
//! (`pci:v00001AF4d00001001sv…`), as `modprobe` does with `fnmatch`.
//!
//! Patterns come from the image (hostile): [`glob_match`] handles `*`, `?` and `[...]`
//! classes without recursion — one remembered star, so a match costs at most
//! pattern × text steps — and patterns or texts longer than [`MAX_PATTERN`] never match. The
//! table keeps only the bus prefixes the compatibility check asks about (`pci:`, `virtio:`)
//! and at most [`MAX_ALIASES`] lines.

use std::collections::BTreeSet;

/// Longest pattern or modalias compared (real ones are under 100 bytes).
pub const MAX_PATTERN: usize = 512;
/// Most aliases kept from one file (a Debian kernel has some 12,000 `pci:` lines).
pub const MAX_ALIASES: usize = 200_000;
/// The buses whose aliases are kept.
const BUSES: &[&str] = &["pci:", "virtio:"];

/// One token of a pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Byte(u8),
    Any,
    Star,
    /// A bracket class: inclusive byte ranges, negated or not.
    Class(bool, Vec<(u8, u8)>),
}

/// The class starting after `[` at `p[i..]`: the token and the index after `]`; `None` when
/// there is no closing `]` (the `[` is then an ordinary byte, as `fnmatch` has it).
fn class(p: &[u8], mut i: usize) -> Option<(Token, usize)> {
    let negated = matches!(p.get(i), Some(b'!' | b'^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let c = *p.get(i)?;
        if c == b']' && !first {
            return Some((Token::Class(negated, ranges), i + 1));
        }
        first = false;
        match (p.get(i + 1), p.get(i + 2)) {
            (Some(b'-'), Some(&hi)) if hi != b']' => {
                ranges.push((c.min(hi), c.max(hi)));
                i += 3;
            }
            _ => {
                ranges.push((c, c));
                i += 1;
            }
        }
    }
}

fn tokens(pattern: &[u8]) -> Vec<Token> {
    let mut out = Vec::with_capacity(pattern.len());
    let mut i = 0;
    while i < pattern.len() {
        let token = match pattern[i] {
            b'*' => Token::Star,
            b'?' => Token::Any,
            b'[' => match class(pattern, i + 1) {
                Some((t, next)) => {
                    out.push(t);
                    i = next;
                    continue;
                }
                None => Token::Byte(b'['),
            },
            b => Token::Byte(b),
        };
        // Consecutive stars are one.
        if !(token == Token::Star && out.last() == Some(&Token::Star)) {
            out.push(token);
        }
        i += 1;
    }
    out
}

fn single(t: &Token, b: u8) -> bool {
    match t {
        Token::Byte(x) => *x == b,
        Token::Any => true,
        Token::Class(negated, ranges) => {
            ranges.iter().any(|(lo, hi)| (*lo..=*hi).contains(&b)) != *negated
        }
        Token::Star => false,
    }
}

/// Whether `text` matches the glob `pattern` (`*`, `?`, `[a-z]`, `[!x]`). Every token but
/// `*` takes exactly one byte, so remembering only the last star is exact, and the work is at
/// most `pattern.len() × text.len()` steps; either longer than [`MAX_PATTERN`]: no match.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    if pattern.len() > MAX_PATTERN || text.len() > MAX_PATTERN {
        return false;
    }
    let p = tokens(pattern.as_bytes());
    let t = text.as_bytes();
    let (mut pi, mut ti) = (0, 0);
    // The last star seen and the text position it was tried from.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some(Token::Star) => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(tok) if single(tok, t[ti]) => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    star = Some((sp, st + 1));
                    pi = sp + 1;
                    ti = st + 1;
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|tok| *tok == Token::Star)
}

/// The aliases of one kernel: (pattern, module name) for the buses the check asks about.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AliasTable {
    aliases: Vec<(String, String)>,
}

impl AliasTable {
    /// Adds the `alias PATTERN MODULE` lines of `text` (a `modules.alias` or
    /// `modules.builtin.modalias`), up to [`MAX_ALIASES`] in all; other lines are skipped.
    pub fn add(&mut self, text: &str) {
        for line in text.lines() {
            if self.aliases.len() >= MAX_ALIASES {
                tracing::debug!("alias table full at {MAX_ALIASES} entries");
                return;
            }
            let mut words = line.split_whitespace();
            let (Some("alias"), Some(pattern), Some(module)) =
                (words.next(), words.next(), words.next())
            else {
                continue;
            };
            if pattern.len() <= MAX_PATTERN
                && module.len() <= crate::compat::MAX_NAME
                && BUSES.iter().any(|b| pattern.starts_with(b))
            {
                self.aliases
                    .push((pattern.to_string(), module.replace('-', "_")));
            }
        }
    }

    /// The modules whose aliases match `modalias`.
    pub fn modules_for(&self, modalias: &str) -> BTreeSet<String> {
        self.aliases
            .iter()
            .filter(|(pattern, _)| glob_match(pattern, modalias))
            .map(|(_, module)| module.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.aliases.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aliases.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn globs_match_as_fnmatch_does() {
        let cases = [
            (
                "pci:v00001AF4d00001001sv*sd*bc*sc*i*",
                "pci:v00001AF4d00001001sv00001AF4sd00000002bc01sc00i00",
                true,
            ),
            (
                "pci:v00001AF4d00001001sv*sd*bc*sc*i*",
                "pci:v00001AF4d00001000sv00001AF4sd00000002bc01sc00i00",
                false,
            ),
            (
                "pci:v*d*sv*sd*bc01sc06i01*",
                "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01",
                true,
            ),
            (
                "pci:v*d*sv*sd*bc01sc06i01*",
                "pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i02",
                false,
            ),
            ("virtio:d00000002v*", "virtio:d00000002v00001AF4", true),
            ("a?c", "abc", true),
            ("a?c", "ac", false),
            ("[ab]x", "bx", true),
            ("[!ab]x", "bx", false),
            ("[^ab]x", "cx", true),
            ("[0-9A-F]", "C", true),
            ("[0-9A-F]", "g", false),
            ("[]]", "]", true),
            ("[a-]", "-", true),
            ("[abc", "[abc", true),
            ("*", "", true),
            ("", "", true),
            ("", "a", false),
            ("a*", "b", false),
            ("*a*b*c", "xaybzc", true),
            ("*a*b*c", "xaybzcd", false),
        ];
        for (p, t, want) in cases {
            assert_eq!(glob_match(p, t), want, "{p:?} against {t:?}");
        }
    }

    #[test]
    fn hostile_patterns_are_bounded_in_time() {
        // Classic exponential cases for backtracking matchers.
        let stars = "*a".repeat(200) + "*b";
        let text = "a".repeat(MAX_PATTERN);
        let classes = "[a-z]*".repeat(80) + "!";
        let unclosed = "[".repeat(MAX_PATTERN);
        let start = Instant::now();
        for _ in 0..20 {
            assert!(!glob_match(&stars, &text));
            assert!(!glob_match(&classes, &text));
            assert!(!glob_match(&unclosed, &text));
            assert!(glob_match(&"*".repeat(MAX_PATTERN), &text));
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert!(!glob_match(&"*".repeat(MAX_PATTERN + 1), "a"), "too long");
        assert!(!glob_match("*", &"a".repeat(MAX_PATTERN + 1)), "too long");
    }

    #[test]
    fn the_table_keeps_bus_aliases_and_finds_modules() {
        let mut t = AliasTable::default();
        t.add(
            "# Aliases extracted from modules themselves.\n\
             alias pci:v00001AF4d00001001sv*sd*bc*sc*i* virtio_pci\n\
             alias virtio:d00000002v* virtio_blk\n\
             alias pci:v*d*sv*sd*bc01sc06i01* ahci\n\
             alias usb:v*p*d*dc*dsc*dp*ic08isc06ip50in* usb-storage\n\
             alias fs-ext4 ext4\nbroken line\nalias pci:v*\n",
        );
        assert_eq!(t.len(), 3);
        assert_eq!(
            t.modules_for("virtio:d00000002v00001AF4"),
            BTreeSet::from(["virtio_blk".to_string()])
        );
        assert!(t
            .modules_for("pci:v00008086d00002922sv00001AF4sd00001100bc01sc06i01")
            .contains("ahci"));
        assert!(t
            .modules_for("pci:v000010ECd00008139sv0sd0bc02sc00i00")
            .is_empty());
    }
}
