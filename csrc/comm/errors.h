#pragma once
// The two error types of tandem's communication runtime. Python sees them as
// tandem.comm.CommError (a RuntimeError) and tandem.comm.CommTimeoutError (a CommError and
// a TimeoutError). Every message names this rank, the peer (or the group) and the operation.
#include <stdexcept>
#include <string>

namespace tandem::comm {

// An operation failed: a peer closed its connection, NCCL reported an error, the
// communicator was aborted.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// An operation did not complete within its timeout.
class CommTimeout : public CommError {
 public:
  using CommError::CommError;
};

}  // namespace tandem::comm
