//! One staged-publish store for what banger keeps as a directory plus a row: images, kernels
//! and snapshots. The ordering rule lives here, and only here:
//!
//! - **Publish**: the object's files are made under a `.staging-*` name (which no row names
//!   and the start-up sweep removes), then, under the shelf's lock, the name is checked, the
//!   directory renamed to `<dir>/<key>`, and the row inserted. A daemon killed between the
//!   rename and the insert leaves a directory no row names; the start-up sweep removes it, and
//!   the state is the old one. A refused or failed insert removes the directory at once.
//! - **Delete**: under the lock the row is found, checked (no VM or snapshot uses it) and
//!   removed; then the files go, outside the lock. A daemon killed in between leaves a
//!   directory no row names, which the sweep removes: the state is the new one.
//!
//! So at any instruction the state on disk is the old or the new one, or a directory the next
//! daemon removes; a row never names files that are not there.

use std::path::PathBuf;
use std::sync::Arc;

use rusqlite::Connection;

use crate::layout::StagingDir;
use crate::store::{Store, StoreError};
use crate::{Error, Result};

/// What a row check answers: go on, or a refusal for the caller.
pub type Verdict<T> = std::result::Result<T, Error>;

/// A directory of published objects and the lock their publication and deletion hold.
#[derive(Clone)]
pub struct Shelf {
    /// `image`, `kernel`, `snapshot`: names the fault points (`<kind>:placed`,
    /// `<kind>:unlisted`) and the messages.
    kind: &'static str,
    dir: PathBuf,
    store: Store,
    lock: Arc<tokio::sync::Mutex<()>>,
}

impl Shelf {
    /// A shelf over `dir` (e.g. `images/`).
    pub fn new(kind: &'static str, dir: PathBuf, store: Store) -> Self {
        Shelf {
            kind,
            dir,
            store,
            lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// Where the object `key` lives once published.
    pub fn path_of(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The lock publication and deletion hold, for other changes that must not interleave
    /// with them (a promotion, a registration's name check). Never held over downloads or
    /// builds.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.lock.lock().await
    }

    /// Publishes `staging` as `key`: under the lock, `check` may refuse (a name taken
    /// meanwhile) before anything moves; then the rename, then `insert` writes the row, which
    /// may still refuse (its own check, in the same transaction), and then the files go again.
    pub async fn publish<C, I>(
        &self,
        mut staging: StagingDir,
        key: &str,
        check: C,
        insert: I,
    ) -> Result<()>
    where
        C: FnOnce(&mut Connection) -> std::result::Result<Verdict<()>, StoreError> + Send + 'static,
        I: FnOnce(&mut Connection) -> std::result::Result<Verdict<()>, StoreError> + Send + 'static,
    {
        let _held = self.lock.lock().await;
        self.store.call(check).await??;
        let dest = self.path_of(key);
        std::fs::rename(staging.path(), &dest)
            .map_err(|e| Error::failed(format!("Cannot move the {} into place", self.kind), e))?;
        staging.keep();
        crate::fault::point(&format!("{}:placed", self.kind));
        match self.store.call(insert).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(refused)) => {
                let _ = crate::layout::remove_any(&dest);
                Err(refused)
            }
            Err(e) => {
                let _ = crate::layout::remove_any(&dest);
                Err(e)
            }
        }
    }

    /// Deletes an object: under the lock `unlist` finds its row, checks that nothing uses it
    /// and removes it, answering the object and its key here (or a refusal); then its files
    /// go, outside the lock.
    pub async fn delete<T, U>(&self, unlist: U) -> Result<T>
    where
        T: Send + 'static,
        U: FnOnce(&mut Connection) -> std::result::Result<Verdict<(T, String)>, StoreError>
            + Send
            + 'static,
    {
        let (object, key) = {
            let _held = self.lock.lock().await;
            self.store.call(unlist).await??
        };
        crate::fault::point(&format!("{}:unlisted", self.kind));
        let dir = self.path_of(&key);
        let kind = self.kind;
        crate::cancel::spawn_blocking(move || crate::layout::remove_any(&dir))
            .await
            .map_err(|e| Error::failed(format!("The {kind} removal task failed"), e))??;
        Ok(object)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shelf() -> (tempfile::TempDir, Shelf) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("things")).unwrap();
        let store = Store::open(&d.path().join("db")).unwrap();
        store
            .call_blocking(|c| {
                c.execute_batch("CREATE TABLE things (key TEXT PRIMARY KEY)")?;
                Ok(())
            })
            .unwrap();
        let s = Shelf::new("thing", d.path().join("things"), store);
        (d, s)
    }

    fn staged(s: &Shelf, name: &str) -> StagingDir {
        let st = StagingDir::create(s.path_of(&format!(".staging-{name}"))).unwrap();
        std::fs::write(st.path().join("file"), name).unwrap();
        st
    }

    fn insert(
        key: &'static str,
    ) -> impl FnOnce(&mut Connection) -> std::result::Result<Verdict<()>, StoreError> {
        move |c| {
            if c.execute("INSERT OR IGNORE INTO things (key) VALUES (?1)", [key])? == 0 {
                return Ok(Err(Error::AlreadyExists(format!("{key} exists"))));
            }
            Ok(Ok(()))
        }
    }

    fn entries(s: &Shelf) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(s.path_of(""))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn a_publish_moves_then_records_and_a_refusal_leaves_no_files() {
        let (_d, s) = shelf();
        s.publish(staged(&s, "a"), "a", |_| Ok(Ok(())), insert("a"))
            .await
            .unwrap();
        assert_eq!(entries(&s), ["a"]);
        assert_eq!(
            std::fs::read_to_string(s.path_of("a").join("file")).unwrap(),
            "a"
        );
        // Refused by the check: nothing moves, the staging goes.
        let e = s
            .publish(
                staged(&s, "b"),
                "b",
                |_| Ok(Err(Error::AlreadyExists("taken".into()))),
                insert("b"),
            )
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)));
        assert_eq!(entries(&s), ["a"]);
        // Refused by the insert (after the rename): the files go again.
        let e = s
            .publish(staged(&s, "a2"), "a2", |_| Ok(Ok(())), insert("a"))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::AlreadyExists(_)));
        assert_eq!(entries(&s), ["a"]);
    }

    #[tokio::test]
    async fn a_delete_removes_the_row_then_the_files_and_a_refusal_keeps_both() {
        let (_d, s) = shelf();
        s.publish(staged(&s, "a"), "a", |_| Ok(Ok(())), insert("a"))
            .await
            .unwrap();
        let e = s
            .delete::<(), _>(|_| Ok(Err(Error::InUse("used".into()))))
            .await
            .unwrap_err();
        assert!(matches!(e, Error::InUse(_)));
        assert_eq!(entries(&s), ["a"]);
        let got = s
            .delete(|c| {
                c.execute("DELETE FROM things WHERE key = 'a'", [])?;
                Ok(Ok((7, "a".to_owned())))
            })
            .await
            .unwrap();
        assert_eq!(got, 7);
        assert!(entries(&s).is_empty());
    }
}
