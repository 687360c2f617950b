//! The CLI reference in README.md, generated from the clap definitions.
//!
//! This module owns the Markdown rendering of the whole `diskferry` command tree
//! (`Cli::command()`: every subcommand, recursively, with its description, usage line, arguments
//! and options) and the test that keeps README.md's section between
//! `<!-- cli-reference:start -->` and `<!-- cli-reference:end -->` equal to it. After changing a
//! command, an argument or a help text, rewrite that section with
//! `DISKFERRY_BLESS=1 cargo test -p diskferry-cli reference`.
//!
//! The output depends on the definitions only: no terminal width, no colours.

use std::fmt::Write;

use clap::builder::PossibleValue;
use clap::{Arg, ArgAction, Command, CommandFactory};

/// The marker lines around the generated section in README.md.
pub const START_MARKER: &str = "<!-- cli-reference:start -->";
pub const END_MARKER: &str = "<!-- cli-reference:end -->";

/// Heading level of the top-level command; subcommands go one level deeper per nesting level.
const TOP_LEVEL: usize = 3;

/// The whole command tree as Markdown, ending with a newline.
pub fn render_markdown() -> String {
    let mut cmd = crate::Cli::command();
    cmd.build();
    let mut out = String::new();
    render_command(&mut out, &mut cmd, &[], 0, &[]);
    // One blank line between blocks, none at the end.
    let trimmed = out.trim_end();
    format!("{trimmed}\n")
}

/// Whether clap shows this subcommand (the generated `help` subcommand is left out: every
/// command's `--help` says the same).
fn listed(cmd: &Command) -> bool {
    !cmd.is_hide_set() && cmd.get_name() != "help"
}

/// Whether this argument is one of clap's own (`--help`, `--version`).
fn generated(arg: &Arg) -> bool {
    matches!(
        arg.get_action(),
        ArgAction::Help | ArgAction::HelpShort | ArgAction::HelpLong | ArgAction::Version
    )
}

fn full_name(path: &[String], cmd: &Command) -> String {
    let mut words = path.to_vec();
    words.push(cmd.get_name().to_string());
    words.join(" ")
}

/// The anchor GitHub gives a heading that reads `` `NAME` ``.
fn anchor(name: &str) -> String {
    name.replace(' ', "-").to_lowercase()
}

fn render_command(
    out: &mut String,
    cmd: &mut Command,
    path: &[String],
    depth: usize,
    inherited: &[String],
) {
    let name = full_name(path, cmd);
    let hashes = "#".repeat((TOP_LEVEL + depth).min(6));
    let _ = writeln!(out, "{hashes} `{name}`\n");

    let text = cmd
        .get_long_about()
        .or(cmd.get_about())
        .map(ToString::to_string)
        .unwrap_or_default();
    if !text.trim().is_empty() {
        let _ = writeln!(out, "{}\n", text.trim());
    }

    let usage = cmd.render_usage().to_string();
    let _ = writeln!(out, "```text\n{}\n```\n", usage.trim());

    render_subcommand_list(out, cmd, &name);
    render_arguments(out, cmd, path, inherited);

    let globals: Vec<String> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .map(|a| a.get_id().to_string())
        .collect();
    let mut path = path.to_vec();
    path.push(cmd.get_name().to_string());
    for sub in cmd.get_subcommands_mut() {
        if listed(sub) {
            render_command(out, sub, &path, depth + 1, &globals);
        }
    }
}

/// The list of a command's subcommands, linked to their sections.
fn render_subcommand_list(out: &mut String, cmd: &Command, name: &str) {
    let subcommands: Vec<(String, String)> = cmd
        .get_subcommands()
        .filter(|c| listed(c))
        .map(|c| {
            let about = c.get_about().map(ToString::to_string).unwrap_or_default();
            (format!("{name} {}", c.get_name()), about)
        })
        .collect();
    if !subcommands.is_empty() {
        out.push_str("Commands:\n\n");
        for (sub, about) in &subcommands {
            let _ = writeln!(out, "- [`{sub}`](#{}): {}", anchor(sub), about.trim());
        }
        out.push('\n');
    }
}

/// A command's positional arguments and options; options it shares with its parent are named
/// once, with a link.
fn render_arguments(out: &mut String, cmd: &Command, path: &[String], inherited: &[String]) {
    let args: Vec<&Arg> = cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !generated(a))
        .collect();
    let (positionals, options): (Vec<&Arg>, Vec<&Arg>) =
        args.iter().partition(|a| a.is_positional());
    let (shared, options): (Vec<&Arg>, Vec<&Arg>) = options
        .into_iter()
        .partition(|a| a.is_global_set() && inherited.contains(&a.get_id().to_string()));
    if !positionals.is_empty() {
        out.push_str("Arguments:\n\n");
        for arg in positionals {
            render_arg(out, arg);
        }
        out.push('\n');
    }
    if !options.is_empty() {
        out.push_str("Options:\n\n");
        for arg in options {
            render_arg(out, arg);
        }
        out.push('\n');
    }
    if !shared.is_empty() {
        let names: Vec<String> = shared
            .iter()
            .map(|a| format!("`{}`", arg_form(a)))
            .collect();
        let _ = writeln!(
            out,
            "Also takes the options of [`{}`](#{}): {}.\n",
            path.join(" "),
            anchor(&path.join(" ")),
            names.join(", ")
        );
    }
}

/// How the argument is written on the command line: `<NAME>`, `[NAME]`, `-p, --partition <N>`,
/// `--json`.
fn arg_form(arg: &Arg) -> String {
    let names: Vec<String> = arg
        .get_value_names()
        .map(|v| v.iter().map(ToString::to_string).collect())
        .unwrap_or_else(|| vec![arg.get_id().to_string().to_uppercase()]);
    let many = arg
        .get_num_args()
        .is_some_and(|n| n.max_values() > 1 && names.len() == 1);
    let dots = if many { "..." } else { "" };
    if arg.is_positional() {
        let (open, close) = if arg.is_required_set() {
            ('<', '>')
        } else {
            ('[', ']')
        };
        return names
            .iter()
            .map(|n| format!("{open}{n}{close}{dots}"))
            .collect::<Vec<_>>()
            .join(" ");
    }
    let mut flags = Vec::new();
    if let Some(s) = arg.get_short() {
        flags.push(format!("-{s}"));
    }
    if let Some(l) = arg.get_long() {
        flags.push(format!("--{l}"));
    }
    let mut form = flags.join(", ");
    if arg.get_action().takes_values() {
        for n in &names {
            let _ = write!(form, " <{n}>{dots}");
        }
    }
    form
}

fn render_arg(out: &mut String, arg: &Arg) {
    let help = arg
        .get_long_help()
        .or(arg.get_help())
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut line = format!("- `{}`", arg_form(arg));
    if !help.trim().is_empty() {
        let _ = write!(line, ": {}", help.trim().replace('\n', " "));
    }
    if !arg.is_positional() && arg.is_required_set() {
        line.push_str(" (required)");
    }
    // A flag's default (`false`) says nothing: clap's own help leaves it out too.
    let takes_values = arg.get_action().takes_values();
    if takes_values && !arg.is_hide_default_value_set() && !arg.get_default_values().is_empty() {
        let defaults: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| format!("`{}`", v.to_string_lossy()))
            .collect();
        let _ = write!(line, " [default: {}]", defaults.join(", "));
    }
    if let Some(env) = arg.get_env().filter(|_| !arg.is_hide_env_set()) {
        let _ = write!(line, " [env: `{}`]", env.to_string_lossy());
    }
    let _ = writeln!(out, "{line}");
    if arg.is_hide_possible_values_set() || !takes_values {
        return;
    }
    let values: Vec<PossibleValue> = arg
        .get_possible_values()
        .into_iter()
        .filter(|v| !v.is_hide_set())
        .collect();
    for v in values {
        match v.get_help() {
            Some(h) => {
                let _ = writeln!(out, "  - `{}`: {}", v.get_name(), h.to_string().trim());
            }
            None => {
                let _ = writeln!(out, "  - `{}`", v.get_name());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    const BLESS: &str =
        "README's CLI reference is out of date: run `DISKFERRY_BLESS=1 cargo test -p diskferry-cli reference`";

    fn readme_path() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../README.md")
    }

    /// The README split around the generated section: text up to and including the start
    /// marker's line, the section, and the text from the end marker on.
    fn split(readme: &str) -> (&str, &str, &str) {
        let start = readme
            .find(START_MARKER)
            .unwrap_or_else(|| panic!("README.md has no {START_MARKER} line"));
        let body = start
            + readme[start..]
                .find('\n')
                .map_or(readme.len() - start, |i| i + 1);
        let end = readme[body..]
            .find(END_MARKER)
            .map(|i| body + i)
            .unwrap_or_else(|| panic!("README.md has no {END_MARKER} line after {START_MARKER}"));
        (&readme[..body], &readme[body..end], &readme[end..])
    }

    #[test]
    fn readme_cli_reference_is_current() {
        let path = readme_path();
        let readme = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let (before, current, after) = split(&readme);
        // Blank lines keep the markers apart from the Markdown around them.
        let wanted = format!("\n{}\n", render_markdown());
        if current == wanted {
            return;
        }
        if std::env::var("DISKFERRY_BLESS").as_deref() == Ok("1") {
            std::fs::write(&path, format!("{before}{wanted}{after}"))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
            eprintln!("rewrote the CLI reference in {}", path.display());
            return;
        }
        let first_difference = current
            .lines()
            .zip(wanted.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| current.lines().count().min(wanted.lines().count()));
        panic!(
            "{BLESS}\n(first difference at line {} of the section)\n  README:    {:?}\n  generated: {:?}",
            first_difference + 1,
            current.lines().nth(first_difference).unwrap_or("<end>"),
            wanted.lines().nth(first_difference).unwrap_or("<end>"),
        );
    }

    #[test]
    fn rendering_is_deterministic_and_plain() {
        let a = render_markdown();
        assert_eq!(a, render_markdown());
        assert!(!a.contains('\u{1b}'), "ANSI escape in the reference");
        assert!(a.contains("#### `diskferry capture`"));
        assert!(a.contains("##### `diskferry machine register`"));
        assert!(a.contains("Usage: diskferry machine register"));
    }

    #[test]
    fn clap_definitions_are_consistent() {
        crate::Cli::command().debug_assert();
    }

    /// `--help` explains every command, argument and value: nothing in the tree lacks a text.
    #[test]
    fn every_command_and_argument_explains_itself() {
        fn check(cmd: &Command, path: &str, gaps: &mut Vec<String>) {
            let name = format!("{path} {}", cmd.get_name()).trim().to_string();
            if cmd
                .get_about()
                .is_none_or(|a| a.to_string().trim().is_empty())
            {
                gaps.push(format!("`{name}` has no about line"));
            }
            for arg in cmd
                .get_arguments()
                .filter(|a| !a.is_hide_set() && !generated(a))
            {
                if arg
                    .get_help()
                    .is_none_or(|h| h.to_string().trim().is_empty())
                {
                    gaps.push(format!("`{name}`: {} has no help text", arg_form(arg)));
                }
                if !arg.get_action().takes_values() {
                    continue;
                }
                for v in arg
                    .get_possible_values()
                    .iter()
                    .filter(|v| !v.is_hide_set())
                {
                    if v.get_help().is_none() {
                        gaps.push(format!(
                            "`{name}`: {} value `{}` has no help text",
                            arg_form(arg),
                            v.get_name()
                        ));
                    }
                }
            }
            for sub in cmd.get_subcommands().filter(|c| listed(c)) {
                check(sub, &name, gaps);
            }
        }
        let mut cmd = crate::Cli::command();
        cmd.build();
        let mut gaps = Vec::new();
        check(&cmd, "", &mut gaps);
        assert!(gaps.is_empty(), "help gaps:\n{}", gaps.join("\n"));
    }
}
