//! Ignore patterns: the tree's `.rsyncfsignore` (gitignore syntax, matched by the `ignore`
//! crate's gitignore matcher) on top of built-in defaults. An ignored path is neither shipped
//! nor applied: its changes stay on the node that made them. The rules file itself is never
//! ignored (it replicates like any file, so every node comes to the same rules).

use crate::path::RelPath;
use ignore::gitignore::{Gitignore, GitignoreBuilder};

/// The rules file, at the root of the tree.
pub const FILE: &str = ".rsyncfsignore";
/// The most of the rules file that is read; the rest is left out (and said so).
pub const FILE_BYTES_MAX: usize = 256 * 1024;

/// Patterns ignored unless `.rsyncfsignore` says otherwise (a `!pattern` line brings one
/// back): editors' swap, backup and lock files, and desktop litter, which change many times a
/// second and mean nothing on another host.
pub const DEFAULTS: &[&str] = &[
    // vim: swap files, and the file it writes to test a directory.
    "*.swp",
    "*.swo",
    "*.swx",
    "4913",
    // emacs: lock links, autosaves; many editors: backups.
    ".#*",
    "#*#",
    "*~",
    // Desktop litter.
    ".DS_Store",
    "Thumbs.db",
];

/// The rules in force.
#[derive(Clone, Debug)]
pub struct IgnoreRules {
    matcher: Gitignore,
    /// The patterns `.rsyncfsignore` gave (besides the defaults).
    pub patterns: usize,
    /// Lines that are not patterns, with why, as `line N: why`.
    pub errors: Vec<String>,
}

impl Default for IgnoreRules {
    fn default() -> Self {
        IgnoreRules::parse("")
    }
}

impl IgnoreRules {
    /// The defaults, then the lines of `text` (so that a line of the file overrides a default).
    pub fn parse(text: &str) -> IgnoreRules {
        let mut builder = GitignoreBuilder::new("");
        for pattern in DEFAULTS {
            builder
                .add_line(None, pattern)
                .expect("the defaults are patterns");
        }
        let mut errors = Vec::new();
        let mut patterns = 0;
        let text = match text.char_indices().nth(FILE_BYTES_MAX) {
            Some((cut, _)) if cut < text.len() => {
                errors.push(format!(
                    "the rules past {FILE_BYTES_MAX} bytes are left out"
                ));
                &text[..cut]
            }
            _ => text,
        };
        for (n, line) in text.lines().enumerate() {
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            match builder.add_line(None, line) {
                Ok(_) => patterns += 1,
                Err(e) => errors.push(format!("line {}: {e}", n + 1)),
            }
        }
        let matcher = builder.build().unwrap_or_else(|e| {
            errors.push(format!("the rules: {e}"));
            Gitignore::empty()
        });
        IgnoreRules {
            matcher,
            patterns,
            errors,
        }
    }

    /// Whether `path` (a directory when `is_dir`) is ignored, itself or through a directory
    /// above it.
    pub fn is_ignored(&self, path: &RelPath, is_dir: bool) -> bool {
        let p = path.as_str();
        if p.is_empty() || p == FILE {
            return false;
        }
        self.matcher
            .matched_path_or_any_parents(p, is_dir)
            .is_ignore()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(p: &str) -> RelPath {
        RelPath::new(p).unwrap()
    }

    #[test]
    fn defaults_patterns_negations_and_directories() {
        let none = IgnoreRules::default();
        assert!(none.is_ignored(&rel("src/.main.c.swp"), false));
        assert!(none.is_ignored(&rel("notes.txt~"), false));
        assert!(none.is_ignored(&rel("d/4913"), false));
        assert!(!none.is_ignored(&rel("src/main.c"), false));
        let rules = IgnoreRules::parse("# logs\n*.log\n!keep.log\nbuild/\n/top-only\n!*.swp\n");
        assert_eq!(rules.patterns, 5);
        assert!(rules.errors.is_empty(), "{:?}", rules.errors);
        assert!(rules.is_ignored(&rel("x.log"), false));
        assert!(rules.is_ignored(&rel("deep/er/x.log"), false));
        assert!(!rules.is_ignored(&rel("keep.log"), false));
        assert!(rules.is_ignored(&rel("build"), true));
        assert!(
            !rules.is_ignored(&rel("build"), false),
            "build/ names directories only"
        );
        assert!(rules.is_ignored(&rel("build/out/x.o"), false));
        assert!(rules.is_ignored(&rel("top-only"), false));
        assert!(!rules.is_ignored(&rel("d/top-only"), false));
        assert!(
            !rules.is_ignored(&rel("a.swp"), false),
            "a line brings a default back"
        );
        assert!(!rules.is_ignored(&rel(FILE), false));
        let everything = IgnoreRules::parse("*\n");
        assert!(
            !everything.is_ignored(&rel(FILE), false),
            "the rules always travel"
        );
    }

    #[test]
    fn a_bad_line_is_reported_and_the_rest_hold() {
        let rules = IgnoreRules::parse("*.tmp\n[z-a]\n*.bak\n");
        assert_eq!(rules.errors.len(), 1, "{:?}", rules.errors);
        assert!(rules.errors[0].starts_with("line 2"), "{:?}", rules.errors);
        assert!(rules.is_ignored(&rel("a.tmp"), false) && rules.is_ignored(&rel("a.bak"), false));
    }
}
