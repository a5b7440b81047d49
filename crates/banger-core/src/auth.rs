//! Authorisation through polkit. The subject is the caller's unique bus name (polkit resolves
//! it to pid, uid and session itself, which is race-free, unlike a pid). Interaction is allowed
//! only when the message carries ALLOW_INTERACTIVE_AUTHORIZATION. Any failure to get an
//! answer from polkit is a denial, never an allowance.

use std::collections::HashMap;
use std::fmt;

use zbus::message::{Flags, Header};
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

/// The polkit actions (docs/ARCHITECTURE.md, "Authorization").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Pull, register, promote, build, delete images.
    ImagesManage,
    /// Pull, import, delete kernels.
    KernelsManage,
    /// Create and manage one's own VMs.
    VmsManage,
    /// Manage VMs owned by another uid.
    VmsManageAny,
}

impl Action {
    /// The polkit action id.
    pub fn id(self) -> &'static str {
        match self {
            Action::ImagesManage => "org.banger.images.manage",
            Action::KernelsManage => "org.banger.kernels.manage",
            Action::VmsManage => "org.banger.vms.manage",
            Action::VmsManageAny => "org.banger.vms.manage-any",
        }
    }

    /// Every action, for the policy file test.
    pub const ALL: [Action; 4] = [
        Action::ImagesManage,
        Action::KernelsManage,
        Action::VmsManage,
        Action::VmsManageAny,
    ];
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.id())
    }
}

/// Who asks, whatever the front end: the uid the transport vouches for, the subject polkit
/// checks (a D-Bus caller's unique name, a Varlink peer's process), and whether the caller
/// allows interactive authorisation.
#[derive(Debug, Clone)]
pub struct Caller {
    /// polkit's subject for the caller; `None` only in unit tests (polkit then denies).
    pub subject: Option<std::sync::Arc<Subject>>,
    /// The caller's uid as the transport knows it.
    pub uid: u32,
    /// Whether the caller allowed interactive authorisation.
    pub interactive: bool,
}

impl Caller {
    /// The caller of a D-Bus method call: the bus tells its uid, and its unique name is the
    /// polkit subject (polkit resolves it itself, race-free).
    pub async fn from_header(conn: &zbus::Connection, hdr: &Header<'_>) -> Result<Self, AuthError> {
        let sender = hdr.sender().ok_or(AuthError::NoSender)?.to_owned();
        let dbus = zbus::fdo::DBusProxy::new(conn)
            .await
            .map_err(|e| AuthError::Unidentified(e.into()))?;
        let uid = dbus
            .get_connection_unix_user(sender.into())
            .await
            .map_err(|e| AuthError::Unidentified(zbus::Error::from(e).into()))?;
        let interactive = hdr
            .primary()
            .flags()
            .contains(Flags::ALLOW_INTERACTIVE_AUTH);
        let subject = Subject::new_for_message_header(hdr).map_err(|_| AuthError::NoSender)?;
        Ok(Caller {
            subject: Some(std::sync::Arc::new(subject)),
            uid,
            interactive,
        })
    }

    /// A caller polkit cannot be asked about (unit tests: polkit then denies).
    pub fn unchecked(uid: u32) -> Self {
        Caller {
            subject: None,
            uid,
            interactive: false,
        }
    }
}

/// What to do after a refusal of `action`.
fn denied_next(action: Action) -> &'static str {
    match action {
        Action::VmsManageAny => {
            "it is another user's (or, to change, the system's) object, and only its owner or \
             an administrator may do this"
        }
        _ => "ask an administrator to add you to the 'banger' group (see polkit/50-banger.rules)",
    }
}

/// What to do when polkit would ask for a password for `action`.
fn interaction_next(action: Action) -> &'static str {
    match action {
        Action::VmsManageAny => {
            "it is another user's (or, to change, the system's) object: only its owner, or an \
             administrator authenticating in a terminal with an agent (e.g. pkttyagent), may \
             do this"
        }
        _ => {
            "run the command in a terminal with an agent (e.g. pkttyagent) or as a member of \
             the 'banger' group"
        }
    }
}

/// Why a caller was not authorised.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// polkit said no.
    #[error("Not authorised for {action}; {}", denied_next(*action))]
    Denied {
        /// The action.
        action: Action,
    },
    /// polkit would ask for a password but the caller did not allow interaction.
    #[error("Authentication is required for {action}; {}", interaction_next(*action))]
    InteractionRequired {
        /// The action.
        action: Action,
    },
    /// polkit could not be asked; denied.
    #[error("Cannot reach polkit to authorise {action}, so access is denied; check that polkitd is installed and running")]
    Unreachable {
        /// The action.
        action: Action,
        /// What went wrong.
        #[source]
        source: Unanswered,
    },
    /// The message had no sender.
    #[error("The call has no sender, so it cannot be authorised")]
    NoSender,
    /// The transport did not tell the caller's uid.
    #[error("Cannot identify the caller")]
    Unidentified(#[source] Unanswered),
}

/// polkit's answer, reduced to what banger does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go ahead.
    Allowed,
    /// No.
    Denied,
    /// Only with interaction the caller did not allow.
    ChallengeRequired,
}

/// Why an authority gave no answer (its transport's error, boxed: nothing above `auth`
/// depends on how polkit is reached).
pub type Unanswered = Box<dyn std::error::Error + Send + Sync>;

/// Something that answers authorisation questions.
#[async_trait::async_trait]
pub trait Authority: Send + Sync {
    /// Asks whether `caller` may perform `action`. An `Err` means no answer could be had
    /// (and is denied), whatever the authority's transport.
    async fn check(&self, caller: &Caller, action: Action) -> Result<Verdict, Unanswered>;
}

/// Decides from an authority's answer: only an explicit yes allows.
pub async fn authorize(
    authority: &dyn Authority,
    caller: &Caller,
    action: Action,
) -> Result<(), AuthError> {
    let verdict = authority
        .check(caller, action)
        .await
        .map_err(|source| AuthError::Unreachable { action, source })?;
    tracing::debug!(
        uid = caller.uid,
        action = action.id(),
        ?verdict,
        "Authorisation checked"
    );
    match verdict {
        Verdict::Allowed => Ok(()),
        Verdict::Denied => Err(AuthError::Denied { action }),
        // The caller did not allow interaction: tell it that interaction would help.
        Verdict::ChallengeRequired if !caller.interactive => {
            Err(AuthError::InteractionRequired { action })
        }
        // Interaction was allowed and polkit still has no yes: no agent answered.
        Verdict::ChallengeRequired => Err(AuthError::Denied { action }),
    }
}

/// The real authority: polkitd on the system bus.
pub struct Polkit {
    conn: zbus::Connection,
}

impl Polkit {
    /// Uses `conn` (the daemon's own bus connection) to reach polkitd.
    pub fn new(conn: zbus::Connection) -> Self {
        Polkit { conn }
    }
}

#[async_trait::async_trait]
impl Authority for Polkit {
    async fn check(&self, caller: &Caller, action: Action) -> Result<Verdict, Unanswered> {
        let proxy = AuthorityProxy::new(&self.conn).await?;
        let subject = caller
            .subject
            .as_deref()
            .ok_or("no polkit subject for the caller")?;
        let flags = if caller.interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let details = HashMap::new();
        let r = proxy
            .check_authorization(subject, action.id(), &details, flags, "")
            .await?;
        Ok(if r.is_authorized {
            Verdict::Allowed
        } else if r.is_challenge {
            Verdict::ChallengeRequired
        } else {
            Verdict::Denied
        })
    }
}

/// A scripted authority that records what it was asked, for unit tests.
#[derive(Default)]
pub struct RecordingAuthority {
    /// The answer to give; `None` plays an unreachable polkit.
    pub answer: std::sync::Mutex<Option<Verdict>>,
    /// Every (uid, action) asked about.
    pub asked: std::sync::Mutex<Vec<(u32, Action)>>,
}

#[async_trait::async_trait]
impl Authority for RecordingAuthority {
    async fn check(&self, caller: &Caller, action: Action) -> Result<Verdict, Unanswered> {
        self.asked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((caller.uid, action));
        let answer = *self.answer.lock().unwrap_or_else(|p| p.into_inner());
        answer.ok_or_else(|| "polkit is gone".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller() -> Caller {
        Caller::unchecked(1000)
    }

    async fn decide(answer: Option<Verdict>) -> Result<(), AuthError> {
        let a = RecordingAuthority::default();
        *a.answer.lock().unwrap() = answer;
        let r = authorize(&a, &caller(), Action::VmsManage).await;
        assert_eq!(*a.asked.lock().unwrap(), vec![(1000, Action::VmsManage)]);
        r
    }

    #[tokio::test]
    async fn only_an_explicit_yes_allows() {
        assert!(decide(Some(Verdict::Allowed)).await.is_ok());
        assert!(matches!(
            decide(Some(Verdict::Denied)).await,
            Err(AuthError::Denied { .. })
        ));
        assert!(matches!(
            decide(Some(Verdict::ChallengeRequired)).await,
            Err(AuthError::InteractionRequired { .. })
        ));
    }

    #[tokio::test]
    async fn a_challenge_for_an_interactive_caller_is_a_denial() {
        let a = RecordingAuthority::default();
        *a.answer.lock().unwrap() = Some(Verdict::ChallengeRequired);
        let c = Caller {
            interactive: true,
            ..caller()
        };
        let r = authorize(&a, &c, Action::ImagesManage).await;
        assert!(matches!(r, Err(AuthError::Denied { .. })));
    }

    #[tokio::test]
    async fn unreachable_polkit_denies() {
        let err = decide(None).await.unwrap_err();
        assert!(matches!(err, AuthError::Unreachable { .. }));
        assert!(err.to_string().contains("access is denied"));
    }
}
