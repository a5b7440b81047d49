//! The SQLite store: WAL, versioned migrations, and every access off the async threads.

mod migrations;
pub mod rows;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::Connection;

pub use rows::JobRecord;

use crate::error::{ErrorKind, Kind};
use crate::{Error, Result};

/// Errors from the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// SQLite refused an operation.
    #[error("State database error")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer banger.
    #[error("The state database has schema version {found}, newer than this banger's {known}; upgrade banger")]
    TooNew {
        /// The version on disk.
        found: i64,
        /// The newest version this build knows.
        known: i64,
    },
    /// A pool (addresses, CIDs) has nothing left.
    #[error("Cannot reserve what the VM needs: {0}")]
    Exhausted(String),
    /// An owner's quota is used up (the message names the config key).
    #[error("{0}")]
    Quota(String),
    /// A row holds a value no banger writes.
    #[error("Corrupt row in the state database: {0}")]
    Corrupt(String),
    /// The row to change is gone (deleted meanwhile).
    #[error("{0}")]
    Gone(String),
}

impl Kind for StoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            StoreError::Quota(_) => ErrorKind::LimitExceeded,
            StoreError::Gone(_) => ErrorKind::NotFound,
            _ => ErrorKind::Failed,
        }
    }
}

/// A handle on the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
}

impl Store {
    /// Opens (creating if needed) and migrates the database at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let open = || -> Result<Connection, StoreError> {
            let mut conn = Connection::open(path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            migrations::migrate(&mut conn)?;
            Ok(conn)
        };
        let conn = open().map_err(|e| {
            Error::failed(
                format!("Cannot open the state database {}", path.display()),
                e,
            )
        })?;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the connection on tokio's blocking pool.
    pub async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            // A panic while holding the lock poisons it; the connection itself is still sound
            // because every write runs in a transaction that a panic rolls back.
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard).map_err(Error::from)
        })
        .await
        .map_err(|e| Error::failed("State database task failed", e))?
    }

    /// Runs `f` on the calling thread; for start-up and tests.
    pub fn call_blocking<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T> {
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard).map_err(Error::from)
    }
}
