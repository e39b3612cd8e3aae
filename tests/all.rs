//! One integration-test binary; each module is a topic.

mod it;
