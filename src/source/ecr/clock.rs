//! AWS's clock, read from the `Date` of its answer. ECR gives a token's expiry as a time on
//! AWS's clock, with no lifetime: a controller whose clock is hours behind would schedule the
//! refresh after the token expired. The lifetime is measured on the clock that set the expiry
//! (expiry − AWS's `Date`) and laid on the local clock, and the status says when the two
//! clocks differ.

use std::sync::{Arc, Mutex};

use aws_sdk_ecr::{
    config::{ConfigBag, Intercept, RuntimeComponents, interceptors::BeforeDeserializationInterceptorContextRef},
    error::BoxError,
};
use k8s_openapi::jiff::{SignedDuration, Timestamp, fmt::rfc2822::DateTimeParser};

/// A `Date` header longer than this is not one (RFC 9110 dates have 29 characters).
const MAX_DATE_LEN: usize = 64;

/// Clocks closer than this are not reported: `Date` has whole seconds, and the answer takes
/// its time to arrive.
const NOTED_SKEW: SignedDuration = SignedDuration::from_secs(60);

/// Records the `Date` header of the answer to one call (set per operation).
#[derive(Debug, Clone, Default)]
pub(super) struct ServerDate(Arc<Mutex<Option<String>>>);

impl Intercept for ServerDate {
    fn name(&self) -> &'static str {
        "regcred-server-date"
    }

    fn read_after_transmit(
        &self,
        context: &BeforeDeserializationInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        _: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let date = context.response().headers().get("date").filter(|d| d.len() <= MAX_DATE_LEN);
        if let Ok(mut slot) = self.0.lock() {
            *slot = date.map(str::to_string);
        }
        Ok(())
    }
}

impl ServerDate {
    /// The server's time when it answered, if it sent a valid `Date`.
    pub(super) fn get(&self) -> Option<Timestamp> {
        let date = self.0.lock().ok()?.clone()?;
        DateTimeParser::new().parse_timestamp(date.as_bytes()).ok()
    }
}

/// One call as the local clock saw it, and the server's `Date`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Exchange {
    pub sent_at: Timestamp,
    pub received_at: Timestamp,
    pub server_date: Option<Timestamp>,
}

impl Exchange {
    /// A call answered at once by a server whose clock agrees.
    #[cfg(test)]
    pub fn at(now: Timestamp) -> Exchange {
        Exchange { sent_at: now, received_at: now, server_date: Some(now) }
    }
}

/// A token's expiry on the local clock, and how far the local clock is from the server's.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LocalExpiry {
    pub expires_at: Timestamp,
    /// Local minus server time, when the server said its time.
    pub skew: Option<SignedDuration>,
}

/// The expiry `expires_at`, set on the server's clock, on the local clock. Clocks within
/// [`NOTED_SKEW`] of each other: as given. Further apart: the lifetime left by the server's
/// clock, counted from when the call was sent, with the server's time taken at the end of the
/// second its `Date` names (so the local expiry is never later than the real one).
pub(super) fn local_expiry(expires_at: Timestamp, call: &Exchange) -> LocalExpiry {
    let Some(server_date) = call.server_date else {
        return LocalExpiry { expires_at, skew: None };
    };
    let skew = call.received_at.duration_since(server_date);
    if skew.abs() < NOTED_SKEW {
        return LocalExpiry { expires_at, skew: Some(skew) };
    }
    let lifetime = expires_at.duration_since(server_date) - SignedDuration::from_secs(1);
    let local = call.sent_at.saturating_add(lifetime).unwrap_or(call.sent_at);
    LocalExpiry { expires_at: local, skew: Some(skew) }
}

/// What the status says about a clock `skew` off AWS's, in whole minutes (so it reads the
/// same at every fetch); nothing when the clocks agree.
pub(super) fn skew_note(skew: SignedDuration) -> Option<String> {
    if skew.abs() < NOTED_SKEW {
        return None;
    }
    let minutes = skew.as_secs().unsigned_abs().div_ceil(60).max(1);
    let (hours, minutes) = (minutes / 60, minutes % 60);
    let direction = if skew.is_negative() { "behind" } else { "ahead of" };
    Some(format!(
        "the controller's clock is {hours}h{minutes:02}m {direction} AWS's: the token's lifetime is measured on AWS's clock"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Issue 20, item 11: a clock 4 h behind AWS's sees a 12 h token as a 16 h one; the
    /// lifetime is taken from AWS's clock instead, counted from when the call was sent.
    #[test]
    fn a_clock_behind_gets_the_lifetime_aws_gave() {
        let call = Exchange {
            sent_at: at("2026-12-03T08:00:00Z"),
            received_at: at("2026-12-03T08:00:01Z"),
            server_date: Some(at("2026-12-03T12:00:00Z")),
        };
        let expiry = local_expiry(at("2026-12-04T00:00:00Z"), &call);
        assert_eq!(expiry.expires_at, at("2026-12-03T19:59:59Z"));
        assert_eq!(expiry.skew, Some(SignedDuration::from_secs(-(4 * 3600 - 1))));
        let note = skew_note(expiry.skew.unwrap()).unwrap();
        assert!(note.contains("4h00m behind"), "{note}");
    }

    #[test]
    fn without_a_date_or_with_agreeing_clocks_the_expiry_is_as_given() {
        let expires = at("2026-12-04T00:00:00Z");
        let undated = Exchange { server_date: None, ..Exchange::at(at("2026-12-03T08:00:00Z")) };
        assert_eq!(local_expiry(expires, &undated), LocalExpiry { expires_at: expires, skew: None });
        let close =
            Exchange { server_date: Some(at("2026-12-03T12:00:00Z")), ..Exchange::at(at("2026-12-03T12:00:30Z")) };
        let expiry = local_expiry(expires, &close);
        assert_eq!(expiry.expires_at, expires);
        assert_eq!(skew_note(expiry.skew.unwrap()), None);
        let ahead = skew_note(SignedDuration::from_secs(90 * 60)).unwrap();
        assert!(ahead.contains("1h30m ahead of"), "{ahead}");
    }

    #[test]
    fn an_http_date_is_read_and_garbage_is_not() {
        let date = ServerDate(Arc::new(Mutex::new(Some("Thu, 03 Dec 2026 11:34:30 GMT".into()))));
        assert_eq!(date.get(), Some(at("2026-12-03T11:34:30Z")));
        let garbage = ServerDate(Arc::new(Mutex::new(Some("yesterday".into()))));
        assert_eq!(garbage.get(), None);
    }
}
