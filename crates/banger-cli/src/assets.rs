//! `banger generate-assets DIR` (hidden): the man pages and shell completions the package
//! ships, generated from the same clap definitions the binaries parse with.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

/// Writes `man/man1/banger*.1`, `man/man8/bangerd.8` and `completions/{banger.bash,_banger,
/// banger.fish}` under `dir`.
pub fn generate(dir: &Path, daemon: clap::Command) -> anyhow::Result<()> {
    let man1 = dir.join("man/man1");
    let man8 = dir.join("man/man8");
    let completions = dir.join("completions");
    for d in [&man1, &man8, &completions] {
        std::fs::create_dir_all(d).with_context(|| format!("Cannot create {}", d.display()))?;
    }
    // One page per command: banger.1, banger-vm.1, banger-vm-run.1, …
    clap_mangen::generate_to(super::Cli::command(), &man1)
        .context("Cannot write the banger man pages")?;
    let mut page = Vec::new();
    clap_mangen::Man::new(daemon)
        .section("8")
        .render(&mut page)
        .context("Cannot render bangerd.8")?;
    std::fs::write(man8.join("bangerd.8"), page).context("Cannot write bangerd.8")?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "banger.bash"),
        (clap_complete::Shell::Zsh, "_banger"),
        (clap_complete::Shell::Fish, "banger.fish"),
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut super::Cli::command(), "banger", &mut out);
        if shell == clap_complete::Shell::Bash {
            out.extend_from_slice(BASH_NAMES.as_bytes());
        }
        std::fs::write(completions.join(file), out)
            .with_context(|| format!("Cannot write the {shell} completion"))?;
    }
    Ok(())
}

/// Bash completion of object names, after clap's own: the first argument of the verbs
/// that name a VM, image, kernel or snapshot is completed from the daemon's lists
/// (`banger complete-names KIND`), as `systemctl` completes unit names.
const BASH_NAMES: &str = r#"
# Object names from the daemon, for the verbs that take one (banger's addition).
_banger_with_names() {
    _banger "$@"
    local cur="${COMP_WORDS[COMP_CWORD]}" words=() i kind=
    [[ $cur == -* ]] && return 0
    for ((i = 1; i < COMP_CWORD; i++)); do
        [[ ${COMP_WORDS[i]} == -* ]] || words+=("${COMP_WORDS[i]}")
    done
    [[ ${#words[@]} -eq 2 ]] || return 0
    case "${words[0]}:${words[1]}" in
        vm:start|vm:stop|vm:delete|vm:show|vm:exec|vm:shell|vm:ssh|vm:logs|vm:pause|vm:resume|vm:snapshot|vm:fork|vm:run) kind=vm ;;
        image:show|image:delete|image:promote|image:warm) kind=image ;;
        kernel:show|kernel:delete) kind=kernel ;;
        snapshot:show|snapshot:delete) kind=snapshot ;;
        *) return 0 ;;
    esac
    local IFS=$'
'
    COMPREPLY=($(compgen -W "$(banger complete-names "$kind" 2>/dev/null)" -- "$cur"))
}
complete -F _banger_with_names -o bashdefault -o default banger
"#;

/// Prints completion's names, a line each, sorted; banger's own dotted ones (`.warm-*`)
/// left out (both transports' `complete-names`).
pub fn print_names(names: impl IntoIterator<Item = String>) {
    let mut names: Vec<String> = names.into_iter().filter(|n| !n.starts_with('.')).collect();
    names.sort();
    for n in names {
        println!("{n}");
    }
}

/// The names of `kind` (vm, image, kernel, snapshot) over D-Bus, for completion.
pub(crate) async fn names(
    t: &mut impl super::transport::Transport,
    kind: &str,
) -> anyhow::Result<Vec<String>> {
    let records = match kind {
        "vm" => t.vms(&Default::default()).await?,
        "image" => t.images().await?,
        "kernel" => t.kernels().await?,
        "snapshot" => t.snapshots().await?,
        _ => Vec::new(),
    };
    Ok(records
        .iter()
        .filter_map(|r| r["name"].as_str().map(str::to_owned))
        .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_and_completions_cover_every_verb() {
        let tmp = tempfile::tempdir().unwrap();
        // The daemon's own page is rendered from what bangerd's main hands in (its Args).
        let daemon = clap::Command::new("bangerd").arg(
            clap::Arg::new("state_dir")
                .long("state-dir")
                .help("State directory"),
        );
        super::generate(tmp.path(), daemon).unwrap();
        let page = std::fs::read_to_string(tmp.path().join("man/man1/banger-vm-run.1")).unwrap();
        assert!(page.contains("\\-\\-rm"), "{page}");
        let daemon = std::fs::read_to_string(tmp.path().join("man/man8/bangerd.8")).unwrap();
        assert!(
            daemon.starts_with(".ie") || daemon.contains(".TH bangerd 8"),
            "{daemon}"
        );
        assert!(daemon.contains("state\\-dir"), "{daemon}");
        let bash = std::fs::read_to_string(tmp.path().join("completions/banger.bash")).unwrap();
        assert!(
            bash.contains("ssh") && bash.contains("run"),
            "bash completion knows vm ssh/run"
        );
    }
}
