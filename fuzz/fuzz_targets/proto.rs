//! Every message a coordinator or worker receives: protobuf bytes → prost → the validated
//! domain types (`TryFrom<proto>`). The first byte picks the message type.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stackwise_proto::model::{Command, Fence, Registration, RunStage, WorkerReport};
use stackwise_proto::pb;

fuzz_target!(|data: &[u8]| {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    match kind % 4 {
        0 => {
            if let Ok(m) = pb::WorkerMessage::decode(bytes) {
                let _ = WorkerReport::try_from(m);
            }
        }
        1 => {
            if let Ok(m) = pb::CoordinatorMessage::decode(bytes) {
                let _ = <(Fence, Command)>::try_from(m);
            }
        }
        2 => {
            if let Ok(m) = pb::RunStage::decode(bytes) {
                let _ = RunStage::try_from(m);
            }
        }
        _ => {
            if let Ok(m) = pb::RegisterRequest::decode(bytes) {
                let _ = Registration::try_from(m);
            }
        }
    }
});
