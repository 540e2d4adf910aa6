//! librdkafka's error codes as typed errors: [`BrokerError::Kafka`] with the code, its description and
//! its [`KafkaErrorKind`].

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::error::{BoxError, BrokerError, KafkaErrorKind};

/// An error of `op` with no error code of librdkafka's (a message of ours, a client that could not be
/// made).
pub(super) fn client_error(op: &'static str, e: impl Into<BoxError>) -> BrokerError {
    BrokerError::Client { op, source: e.into() }
}

/// A `KafkaError` of `op`: typed by its error code when it has one.
pub(super) fn kafka_error(op: &'static str, e: KafkaError) -> BrokerError {
    let code = match e {
        KafkaError::AdminOp(code) => Some(code),
        ref e => e.rdkafka_error_code(),
    };
    match code {
        Some(code) => code_error(op, code),
        None => client_error(op, e),
    }
}

/// An error code of `op`.
pub(super) fn code_error(op: &'static str, code: RDKafkaErrorCode) -> BrokerError {
    BrokerError::Kafka {
        op,
        kind: kind_of(code),
        code: code as i32,
        message: code.to_string(),
    }
}

/// What the code means for the caller.
pub(super) fn kind_of(code: RDKafkaErrorCode) -> KafkaErrorKind {
    use KafkaErrorKind as K;
    use RDKafkaErrorCode as C;
    match code {
        C::BrokerTransportFailure
        | C::AllBrokersDown
        | C::Resolve
        | C::BrokerNotAvailable
        | C::LeaderNotAvailable
        | C::NotLeaderForPartition
        | C::NetworkException
        | C::CoordinatorLoadInProgress
        | C::CoordinatorNotAvailable
        | C::NotCoordinator
        | C::WaitingForCoordinator
        | C::BrokerDestroy
        | C::DestroyBroker => K::BrokerDown,
        C::Authentication
        | C::SaslAuthenticationFailed
        | C::UnsupportedSASLMechanism
        | C::IllegalSASLState
        | C::SSL
        | C::UnacceptableCredential => K::Authentication,
        C::TopicAuthorizationFailed
        | C::GroupAuthorizationFailed
        | C::ClusterAuthorizationFailed
        | C::TransactionalIdAuthorizationFailed
        | C::DelegationTokenAuthorizationFailed => K::Authorization,
        C::UnknownTopicOrPartition | C::UnknownTopic | C::UnknownPartition | C::UnknownTopicId => {
            K::UnknownTopicOrPartition
        }
        C::RebalanceInProgress => K::RebalanceInProgress,
        C::IllegalGeneration
        | C::UnknownMemberId
        | C::FencedMemberEpoch
        | C::StaleMemberEpoch
        | C::AssignmentLost
        | C::UnknownGroup => K::StaleMember,
        C::FencedInstanceId
        | C::ProducerFenced
        | C::Fenced
        | C::InvalidProducerEpoch
        | C::TransactionCoordinatorFenced => K::Fenced,
        C::MessageSizeTooLarge | C::MessageBatchTooLarge | C::InvalidMessageSize | C::OffsetMetadataTooLarge => {
            K::MessageTooLarge
        }
        C::QueueFull => K::QueueFull,
        C::MessageTimedOut
        | C::RequestTimedOut
        | C::OperationTimedOut
        | C::TimedOutQueue
        | C::InvalidTransactionTimeout => K::Timeout,
        C::InvalidArgument
        | C::InvalidConfig
        | C::InvalidTopic
        | C::InvalidRequest
        | C::InvalidGroupId
        | C::InvalidSessionTimeout
        | C::InvalidPartitions
        | C::InvalidReplicationFactor
        | C::InvalidRequiredAcks
        | C::PolicyViolation
        | C::UnsupportedVersion
        | C::UnsupportedFeature
        | C::NotConfigured => K::InvalidConfig,
        _ => K::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_carry_their_number_description_and_kind() {
        let e = code_error("commit", RDKafkaErrorCode::IllegalGeneration);
        let BrokerError::Kafka {
            op,
            kind,
            code,
            ref message,
        } = e
        else {
            panic!("{e:?}");
        };
        assert_eq!((op, kind, code), ("commit", KafkaErrorKind::StaleMember, 22));
        assert!(message.contains("generation"), "{message}");
        assert!(e.to_string().starts_with("commit: "), "{e}");
        assert_eq!(e.kafka_kind(), Some(KafkaErrorKind::StaleMember));
    }

    #[test]
    fn errors_without_a_code_stay_client_errors() {
        let e = kafka_error("subscribe", KafkaError::Subscription("bad pattern".into()));
        assert!(matches!(e, BrokerError::Client { op: "subscribe", .. }), "{e:?}");
        let e = kafka_error(
            "publish",
            KafkaError::MessageProduction(RDKafkaErrorCode::TopicAuthorizationFailed),
        );
        assert_eq!(e.kafka_kind(), Some(KafkaErrorKind::Authorization));
        let e = kafka_error("create topic", KafkaError::AdminOp(RDKafkaErrorCode::PolicyViolation));
        assert_eq!(e.kafka_kind(), Some(KafkaErrorKind::InvalidConfig), "{e}");
    }

    #[test]
    fn each_kind_has_a_code() {
        for (code, kind) in [
            (RDKafkaErrorCode::AllBrokersDown, KafkaErrorKind::BrokerDown),
            (
                RDKafkaErrorCode::SaslAuthenticationFailed,
                KafkaErrorKind::Authentication,
            ),
            (
                RDKafkaErrorCode::GroupAuthorizationFailed,
                KafkaErrorKind::Authorization,
            ),
            (
                RDKafkaErrorCode::UnknownTopicOrPartition,
                KafkaErrorKind::UnknownTopicOrPartition,
            ),
            (
                RDKafkaErrorCode::RebalanceInProgress,
                KafkaErrorKind::RebalanceInProgress,
            ),
            (RDKafkaErrorCode::UnknownMemberId, KafkaErrorKind::StaleMember),
            (RDKafkaErrorCode::FencedInstanceId, KafkaErrorKind::Fenced),
            (RDKafkaErrorCode::MessageSizeTooLarge, KafkaErrorKind::MessageTooLarge),
            (RDKafkaErrorCode::QueueFull, KafkaErrorKind::QueueFull),
            (RDKafkaErrorCode::MessageTimedOut, KafkaErrorKind::Timeout),
            (RDKafkaErrorCode::InvalidConfig, KafkaErrorKind::InvalidConfig),
            (RDKafkaErrorCode::OffsetOutOfRange, KafkaErrorKind::Other),
        ] {
            assert_eq!(kind_of(code), kind, "{code:?}");
        }
    }
}
