from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenTree(_message.Message):
    __slots__ = ("tokens", "parents", "probs", "draft_probs", "origins")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARENTS_FIELD_NUMBER: _ClassVar[int]
    PROBS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    ORIGINS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    parents: _containers.RepeatedScalarFieldContainer[int]
    probs: bytes
    draft_probs: bytes
    origins: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., parents: _Optional[_Iterable[int]] = ..., probs: _Optional[bytes] = ..., draft_probs: _Optional[bytes] = ..., origins: _Optional[_Iterable[str]] = ...) -> None: ...

class Features(_message.Message):
    __slots__ = ("first", "rows", "width", "dtype", "data")
    FIRST_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    first: int
    rows: int
    width: int
    dtype: str
    data: bytes
    def __init__(self, first: _Optional[int] = ..., rows: _Optional[int] = ..., width: _Optional[int] = ..., dtype: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "has_seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    HAS_SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    has_seed: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., has_seed: _Optional[bool] = ...) -> None: ...

class DraftItem(_message.Message):
    __slots__ = ("request_id", "context", "k", "sampling", "position", "features")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    context: _containers.RepeatedScalarFieldContainer[int]
    k: int
    sampling: SamplingParams
    position: int
    features: Features
    def __init__(self, request_id: _Optional[str] = ..., context: _Optional[_Iterable[int]] = ..., k: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., position: _Optional[int] = ..., features: _Optional[_Union[Features, _Mapping]] = ...) -> None: ...

class DraftRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[DraftItem]
    def __init__(self, items: _Optional[_Iterable[_Union[DraftItem, _Mapping]]] = ...) -> None: ...

class DraftResponse(_message.Message):
    __slots__ = ("trees", "drafter", "seconds")
    TREES_FIELD_NUMBER: _ClassVar[int]
    DRAFTER_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    trees: _containers.RepeatedCompositeFieldContainer[TokenTree]
    drafter: str
    seconds: float
    def __init__(self, trees: _Optional[_Iterable[_Union[TokenTree, _Mapping]]] = ..., drafter: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_id", "output")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    output: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., output: _Optional[_Iterable[int]] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FuseRequest(_message.Message):
    __slots__ = ("request_id", "drafts", "drafters", "max_nodes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DRAFTS_FIELD_NUMBER: _ClassVar[int]
    DRAFTERS_FIELD_NUMBER: _ClassVar[int]
    MAX_NODES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    drafts: _containers.RepeatedCompositeFieldContainer[TokenTree]
    drafters: _containers.RepeatedScalarFieldContainer[str]
    max_nodes: int
    def __init__(self, request_id: _Optional[str] = ..., drafts: _Optional[_Iterable[_Union[TokenTree, _Mapping]]] = ..., drafters: _Optional[_Iterable[str]] = ..., max_nodes: _Optional[int] = ...) -> None: ...

class FuseResponse(_message.Message):
    __slots__ = ("tree",)
    TREE_FIELD_NUMBER: _ClassVar[int]
    tree: TokenTree
    def __init__(self, tree: _Optional[_Union[TokenTree, _Mapping]] = ...) -> None: ...

class VerifyRequest(_message.Message):
    __slots__ = ("request_id", "round", "context", "prompt_len", "tree", "sampling", "max_new_tokens", "ignore_eos", "speculative", "features", "sent_unix")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    SPECULATIVE_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    SENT_UNIX_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    round: int
    context: _containers.RepeatedScalarFieldContainer[int]
    prompt_len: int
    tree: TokenTree
    sampling: SamplingParams
    max_new_tokens: int
    ignore_eos: bool
    speculative: bool
    features: bool
    sent_unix: float
    def __init__(self, request_id: _Optional[str] = ..., round: _Optional[int] = ..., context: _Optional[_Iterable[int]] = ..., prompt_len: _Optional[int] = ..., tree: _Optional[_Union[TokenTree, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., ignore_eos: _Optional[bool] = ..., speculative: _Optional[bool] = ..., features: _Optional[bool] = ..., sent_unix: _Optional[float] = ...) -> None: ...

class VerifyJob(_message.Message):
    __slots__ = ("request", "reply_to", "deadline_ms", "job_id", "trace")
    class TraceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    REPLY_TO_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TRACE_FIELD_NUMBER: _ClassVar[int]
    request: VerifyRequest
    reply_to: str
    deadline_ms: int
    job_id: str
    trace: _containers.ScalarMap[str, str]
    def __init__(self, request: _Optional[_Union[VerifyRequest, _Mapping]] = ..., reply_to: _Optional[str] = ..., deadline_ms: _Optional[int] = ..., job_id: _Optional[str] = ..., trace: _Optional[_Mapping[str, str]] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("response", "code", "message", "job_id")
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    response: VerifyResponse
    code: int
    message: str
    job_id: str
    def __init__(self, response: _Optional[_Union[VerifyResponse, _Mapping]] = ..., code: _Optional[int] = ..., message: _Optional[str] = ..., job_id: _Optional[str] = ...) -> None: ...

class VerifyResponse(_message.Message):
    __slots__ = ("request_id", "round", "token_ids", "accepted", "accepted_nodes", "seconds", "batch", "finished", "finish_reason", "replayed", "features", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_NODES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    round: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    accepted: int
    accepted_nodes: _containers.RepeatedScalarFieldContainer[int]
    seconds: float
    batch: int
    finished: bool
    finish_reason: str
    replayed: bool
    features: Features
    timings: VerifyTimings
    def __init__(self, request_id: _Optional[str] = ..., round: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., accepted: _Optional[int] = ..., accepted_nodes: _Optional[_Iterable[int]] = ..., seconds: _Optional[float] = ..., batch: _Optional[int] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., replayed: _Optional[bool] = ..., features: _Optional[_Union[Features, _Mapping]] = ..., timings: _Optional[_Union[VerifyTimings, _Mapping]] = ...) -> None: ...

class VerifyTimings(_message.Message):
    __slots__ = ("queue_s", "batch_wait_s", "commit_s", "handle_s")
    QUEUE_S_FIELD_NUMBER: _ClassVar[int]
    BATCH_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    COMMIT_S_FIELD_NUMBER: _ClassVar[int]
    HANDLE_S_FIELD_NUMBER: _ClassVar[int]
    queue_s: float
    batch_wait_s: float
    commit_s: float
    handle_s: float
    def __init__(self, queue_s: _Optional[float] = ..., batch_wait_s: _Optional[float] = ..., commit_s: _Optional[float] = ..., handle_s: _Optional[float] = ...) -> None: ...
