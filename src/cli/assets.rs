//! `banger generate-assets DIR` (hidden): the man pages and shell completions the package
//! ships, generated from the same clap definitions the binaries parse with.

use std::path::Path;

use anyhow::Context;
use clap::CommandFactory;

/// Writes `man/man1/banger*.1`, `man/man8/bangerd.8` and `completions/{banger.bash,_banger,
/// banger.fish}` under `dir`.
pub fn generate(dir: &Path) -> anyhow::Result<()> {
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
    clap_mangen::Man::new(crate::daemon::Args::command())
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
        std::fs::write(completions.join(file), out)
            .with_context(|| format!("Cannot write the {shell} completion"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn pages_and_completions_cover_every_verb() {
        let tmp = tempfile::tempdir().unwrap();
        super::generate(tmp.path()).unwrap();
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
