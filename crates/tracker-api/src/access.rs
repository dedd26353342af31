//! What a caller may do: its [`Role`], and every decision about who may act
//! on which session or connection (docs/security.md). [`crate::auth`] says
//! who the caller is; this module says what follows from it.
//!
//! `service` (proxies, the session API) and `admin` act on any session, as
//! anyone. A plain `user` acts only on sessions it owns (`spec.user` of the
//! Session resource), and only as itself. The checks on [`Principal`] are
//! pure functions, unit-tested without a server; [`authorize`],
//! [`authorize_connection`] and [`authorize_history`] add the one store
//! lookup a plain user costs. The hot path, a user's HTTP heartbeat, costs
//! none: [`Principal::owner_required`] hands the rule to the heartbeat's own
//! script call.

use tracker_core::{ConnectionView, NotOwner, SessionId, SessionView, UserId};

use crate::error::ApiError;
use crate::state::AppState;

/// What a token's `roles` claim entitles the caller to: the highest role it
/// carries. One value, so "privileged but also a user" cannot be stated
/// twice, or inconsistently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `admin`: any session, as anyone.
    Admin,
    /// `service` (proxies, the session API): any session, as anyone.
    Service,
    /// `user`: its own sessions, as itself.
    User,
    /// None of the known roles: may act as itself, on no session.
    Unrecognized,
}

impl Role {
    /// The highest known role among `roles`; unknown names are ignored.
    pub fn from_claims<S: AsRef<str>>(roles: &[S]) -> Self {
        let has = |name: &str| roles.iter().any(|r| r.as_ref() == name);
        if has("admin") {
            Role::Admin
        } else if has("service") {
            Role::Service
        } else if has("user") {
            Role::User
        } else {
            Role::Unrecognized
        }
    }

    /// Whether it acts on any session, as anyone.
    pub fn is_privileged(self) -> bool {
        matches!(self, Role::Admin | Role::Service)
    }

    /// The claim that stands for it; [`Role::from_claims`] of it gives the
    /// role back (a ticket carries its issuer's role this way).
    pub fn claim(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Service => "service",
            Role::User => "user",
            Role::Unrecognized => "",
        }
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`: the caller's user id.
    pub subject: UserId,
    pub role: Role,
}

impl Principal {
    /// Whether it acts on any session, as anyone (`service` or `admin`).
    pub fn is_privileged(&self) -> bool {
        self.role.is_privileged()
    }

    /// For `service`/`admin`-only routes.
    pub fn require_privileged(&self) -> Result<(), ApiError> {
        if self.is_privileged() {
            Ok(())
        } else {
            Err(ApiError::Forbidden(
                "this route needs the service or admin role",
            ))
        }
    }

    /// Whether the caller may act on a session, given what the tracker knows
    /// of it. A plain user cannot own a session whose owner is unknown, so an
    /// unknown session is a 404 for it, while another user's is a 403.
    pub fn check_session(&self, view: Option<&SessionView>) -> Result<(), ApiError> {
        let Some(me) = self.owner_required()? else {
            return Ok(());
        };
        check_owner(me, view.and_then(|v| v.owner.as_deref()))
    }

    /// The user who must own a session for this caller to act on it; `None`
    /// when any session will do (services, admins). A store script can then
    /// check the owner in the call that acts, as [`Self::check_session`]
    /// would, instead of a session view before it.
    pub fn owner_required(&self) -> Result<Option<&UserId>, ApiError> {
        match self.role {
            Role::Admin | Role::Service => Ok(None),
            Role::Unrecognized => Err(ApiError::Forbidden("the token carries no known role")),
            Role::User => Ok(Some(&self.subject)),
        }
    }

    /// Whether the caller may state a connection's `client_ip` itself; a
    /// plain user's is the address it connects from.
    pub fn may_set_client_ip(&self) -> bool {
        self.is_privileged()
    }

    /// Whether the caller may act as `user` (register a connection for it).
    pub fn check_acting_as(&self, user: &UserId) -> Result<(), ApiError> {
        if self.is_privileged() || user == &self.subject {
            Ok(())
        } else {
            Err(ApiError::Forbidden("a user may only act as itself"))
        }
    }

    /// Whether a WebSocket of this caller counts against the per-user cap of
    /// the replica (services and admins front many users).
    pub fn counts_websockets(&self) -> bool {
        !self.is_privileged()
    }
}

/// Whether `principal` may act on `session`. Only plain users cost a lookup:
/// services and admins act on any session.
pub async fn authorize(
    state: &AppState,
    principal: &Principal,
    session: &SessionId,
) -> Result<(), ApiError> {
    if principal.is_privileged() {
        return Ok(());
    }
    let view = state.store.session(session).await?;
    principal.check_session(view.as_ref())
}

/// The rule of [`Principal::check_session`] for a plain user `me`, given the
/// session's owner. A plain user cannot own a session whose owner is
/// unknown, so an unknown owner is a 404, another user's a 403.
pub fn check_owner(me: &UserId, owner: Option<&str>) -> Result<(), ApiError> {
    match owner {
        None => Err(not_owner(NotOwner::NoOwner)),
        Some(owner) if owner == me.as_str() => Ok(()),
        Some(_) => Err(not_owner(NotOwner::OtherOwner)),
    }
}

/// What a plain user hears when the store refused it as not the session's
/// owner: the same answers as [`check_owner`]'s.
pub fn not_owner(why: NotOwner) -> ApiError {
    match why {
        NotOwner::NoOwner => ApiError::SessionNotFound,
        NotOwner::OtherOwner => ApiError::Forbidden(OTHER_OWNER),
    }
}

/// What a plain user hears of another user's session.
pub const OTHER_OWNER: &str = "the session belongs to another user";

/// Whether `principal` may read `session`'s history, and whose: `None` for
/// all of it (services and admins), or the `metadata.uid` of the Session
/// resource a user owns now, so that an earlier resource under the same
/// name (someone else's, perhaps) stays hidden.
pub async fn authorize_history(
    state: &AppState,
    principal: &Principal,
    session: &SessionId,
) -> Result<Option<String>, ApiError> {
    if principal.is_privileged() {
        return Ok(None);
    }
    let found = state.store.session_with_uid(session).await?;
    principal.check_session(found.as_ref().map(|(view, _)| view))?;
    Ok(Some(found.and_then(|(_, uid)| uid).unwrap_or_default()))
}

/// Whether `principal` may see `connection`: a user sees its own
/// connections, and every connection of its sessions. A session it may not
/// know of answers as if the connection did not exist.
pub async fn authorize_connection(
    state: &AppState,
    principal: &Principal,
    connection: &ConnectionView,
) -> Result<(), ApiError> {
    if principal.is_privileged() || connection.user_id == principal.subject {
        return Ok(());
    }
    authorize(state, principal, &connection.session_id)
        .await
        .map_err(|e| match e {
            ApiError::SessionNotFound => ApiError::ConnectionNotFound,
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracker_core::SessionState;

    fn principal(sub: &str, role: Role) -> Principal {
        Principal {
            subject: sub.parse().unwrap(),
            role,
        }
    }

    fn view(owner: Option<&str>) -> SessionView {
        crate::test_support::view(&"s1".parse().unwrap(), SessionState::Idle, owner)
    }

    #[test]
    fn the_highest_role_wins() {
        for (roles, role) in [
            (&["user", "admin"][..], Role::Admin),
            (&["service", "user"], Role::Service),
            (&["user"], Role::User),
            (&["superuser", "User"], Role::Unrecognized),
            (&[], Role::Unrecognized),
        ] {
            assert_eq!(Role::from_claims(roles), role, "{roles:?}");
        }
        assert!(Role::Admin.is_privileged() && Role::Service.is_privileged());
        assert!(!Role::User.is_privileged() && !Role::Unrecognized.is_privileged());
        for role in [Role::Admin, Role::Service, Role::User, Role::Unrecognized] {
            assert_eq!(Role::from_claims(&[role.claim()]), role);
        }
    }

    #[test]
    fn session_access_matrix() {
        let alice = principal("alice", Role::User);
        let service = principal("proxy", Role::Service);
        let admin = principal("root", Role::Admin);
        let nobody = principal("x", Role::Unrecognized);
        assert!(alice.check_session(Some(&view(Some("alice")))).is_ok());
        assert!(matches!(
            alice.check_session(Some(&view(Some("bob")))),
            Err(ApiError::Forbidden(_))
        ));
        assert!(matches!(
            alice.check_session(None),
            Err(ApiError::SessionNotFound)
        ));
        assert!(matches!(
            alice.check_session(Some(&view(None))),
            Err(ApiError::SessionNotFound)
        ));
        assert!(service.check_session(None).is_ok());
        assert!(admin.check_session(Some(&view(Some("bob")))).is_ok());
        assert!(matches!(
            nobody.check_session(Some(&view(Some("x")))),
            Err(ApiError::Forbidden(_))
        ));
        assert!(alice.require_privileged().is_err());
        assert!(nobody.require_privileged().is_err());
        assert!(service.require_privileged().is_ok());
        assert!(admin.require_privileged().is_ok());
        assert!(alice.check_acting_as(&"alice".parse().unwrap()).is_ok());
        assert!(alice.check_acting_as(&"bob".parse().unwrap()).is_err());
        assert!(nobody.check_acting_as(&"x".parse().unwrap()).is_ok());
        assert!(service.check_acting_as(&"bob".parse().unwrap()).is_ok());
        assert!(!alice.may_set_client_ip() && service.may_set_client_ip());
        assert!(alice.counts_websockets() && nobody.counts_websockets());
        assert!(!service.counts_websockets() && !admin.counts_websockets());
    }
}
