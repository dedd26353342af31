-- Each history row names the Session resource (metadata.uid) its session was
-- when the connection ended. A Session deleted and created again under the
-- same name is another session: its owner sees its own history, not the
-- previous resource's. NULL for sessions without resource and for rows
-- archived before this column existed.
ALTER TABLE connection_history ADD COLUMN session_uid text NULL;

CREATE INDEX connection_history_session_uid_idx
    ON connection_history (session_id, session_uid, disconnected_at DESC);
