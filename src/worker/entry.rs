//! Queue entries as the worker reads them: parsed and checked, or rejected with a reason.

use crate::resources::from_micros;
use crate::store::mysql::{ChatWrite, MessageWrite};
use crate::store::queue::stream::{self, Delivered, Release};
use crate::store::queue::{Keys, Kind, QueuedWrite, Shard, version_of};

/// One accepted write, ready to persist.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    Chat(ChatWrite),
    Message(MessageWrite),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub id: String,
    pub shard: Shard,
    pub token: String,
    pub write: Write,
}

impl Entry {
    /// Parses a stream entry; the error says why it cannot be persisted.
    pub fn parse(item: &Delivered) -> Result<Self, String> {
        let raw = &item.raw;
        let version = version_of(&raw.id).ok_or("the entry id is not a stream id")?;
        let w = QueuedWrite::decode(stream::payload(raw)?).map_err(|e| e.to_string())?;
        let time =
            |us: i64| from_micros(us).ok_or_else(|| format!("timestamp {us} is out of range"));
        let (created_at, updated_at) = (time(w.created_us)?, time(w.updated_us)?);
        let write = match w.kind {
            Kind::Chat => Write::Chat(ChatWrite {
                app_id: w.app_id,
                number: w.chat,
                title: w.text,
                version,
                created_at,
                updated_at,
            }),
            Kind::Message => Write::Message(MessageWrite {
                app_id: w.app_id,
                chat_number: w.chat,
                number: w.number,
                body: w.text.unwrap_or_default(),
                version,
                created_at,
                updated_at,
            }),
        };
        Ok(Self {
            id: raw.id.clone(),
            shard: item.shard,
            token: w.token,
            write,
        })
    }

    /// The pending record this entry wrote, to release once it is persisted.
    pub fn release(&self, keys: &Keys) -> Release {
        let (hash, field) = match &self.write {
            Write::Chat(c) => (keys.chat_records(&self.token), c.number),
            Write::Message(m) => (keys.message_records(&self.token, m.chat_number), m.number),
        };
        Release {
            hash,
            field,
            version: self.id.clone(),
        }
    }

    /// The parents whose counts this entry may change.
    pub fn touched(&self) -> Vec<String> {
        match &self.write {
            Write::Chat(c) => vec![
                format!("a:{}", c.app_id),
                format!("c:{}:{}", c.app_id, c.number),
            ],
            Write::Message(m) => vec![format!("c:{}:{}", m.app_id, m.chat_number)],
        }
    }
}

/// A parent whose count needs a refresh, as stored in the `touched` set.
#[derive(Debug, PartialEq, Eq)]
pub enum Parent {
    Application(u64),
    Chat(u64, u64),
}

impl Parent {
    pub fn parse(member: &str) -> Option<Self> {
        let mut parts = member.split(':');
        let parent = match (parts.next()?, parts.next(), parts.next()) {
            ("a", Some(app), None) => Self::Application(app.parse().ok()?),
            ("c", Some(app), Some(chat)) => Self::Chat(app.parse().ok()?, chat.parse().ok()?),
            _ => return None,
        };
        parts.next().is_none().then_some(parent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::Value;
    use redis::streams::StreamId;

    fn raw(payload: &str) -> Delivered {
        Delivered {
            shard: 3,
            raw: StreamId {
                id: "1700000000000-3".into(),
                map: [(
                    "e".to_owned(),
                    Value::BulkString(payload.as_bytes().to_vec()),
                )]
                .into_iter()
                .collect(),
                ..StreamId::default()
            },
        }
    }

    #[test]
    fn messages_parse() {
        let entry =
            Entry::parse(&raw("m|7|tok|2|5|1700000000000000|1700000000000001|1|hi")).unwrap();
        let Write::Message(m) = &entry.write else {
            panic!("not a message")
        };
        assert_eq!(
            (m.app_id, m.chat_number, m.number, m.body.as_str()),
            (7, 2, 5, "hi")
        );
        assert_eq!(m.version, version_of("1700000000000-3").unwrap());
        assert_eq!(entry.touched(), vec!["c:7:2"]);
    }

    #[test]
    fn chats_without_title_parse() {
        let entry = Entry::parse(&raw("c|7|tok|2|0|1700000000000000|1700000000000000|0|")).unwrap();
        let Write::Chat(c) = &entry.write else {
            panic!("not a chat")
        };
        assert_eq!(c.title, None);
        assert_eq!(entry.touched(), vec!["a:7", "c:7:2"]);
    }

    #[test]
    fn malformed_entries_say_why() {
        let err = Entry::parse(&raw("m|x|tok|1|1|1|1|1|b")).unwrap_err();
        assert!(err.contains("app id"), "{err}");
        let missing = Delivered {
            shard: 0,
            raw: StreamId {
                id: "1-1".into(),
                ..StreamId::default()
            },
        };
        assert!(Entry::parse(&missing).unwrap_err().contains("`e`"));
        let mut not_text = raw("");
        not_text
            .raw
            .map
            .insert("e".into(), Value::BulkString(vec![b'm', b'|', 0xff]));
        assert!(Entry::parse(&not_text).unwrap_err().contains("UTF-8"));
        let mut not_a_string = raw("");
        not_a_string.raw.map.insert("e".into(), Value::Int(1));
        assert!(
            Entry::parse(&not_a_string)
                .unwrap_err()
                .contains("not a string")
        );
    }

    #[test]
    fn parents_round_trip() {
        assert_eq!(Parent::parse("a:3"), Some(Parent::Application(3)));
        assert_eq!(Parent::parse("c:3:4"), Some(Parent::Chat(3, 4)));
        assert_eq!(Parent::parse("c:3"), None);
        assert_eq!(Parent::parse("a:3:4:5"), None);
    }
}
