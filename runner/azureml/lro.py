"""Waiting for Azure's long-running operations (azure-core LROPoller) and checking how they ended.

Creating an endpoint, a deployment or a cluster, and deleting one, take minutes: the service answers at once with a
poller whose status is InProgress. A step that goes on without waiting would call an endpoint that has no scoring
URI yet, or leave a delete half done. So every operation is waited for here, and must end Succeeded; the caller
names what it needs of the result (a scoring URI)."""

from typing import Any, Optional, Sequence

from runner.azureml.checks import AzureStepError


def finish(poller: Any, what: str, *, needs: Sequence[str] = (), timeout: Optional[float] = None) -> Any:
    """poller.result() (which waits, and raises the service's error when the operation failed), then its status
    must be Succeeded and the result must have each attribute in `needs`; returns the result."""
    result = poller.result(timeout) if timeout is not None else poller.result()
    if not poller.done():
        raise AzureStepError(f"{what}: still {poller.status()} after waiting {timeout} s; see it in the studio")
    status = str(poller.status())
    if status.lower() != "succeeded":
        raise AzureStepError(f"{what}: the operation ended {status}, not Succeeded")
    missing = [name for name in needs if not getattr(result, name, None)]
    if missing:
        raise AzureStepError(f"{what}: the operation succeeded but its result has no {', '.join(missing)}")
    return result


# What the service says when a subscription's quota for a VM family or tier runs out (ARM error codes as the
# HttpResponseError carries them, and the words of its message).
QUOTA_CODES = ("quotaexceeded", "insufficientquota", "insufficientresourcequota", "operationnotallowed")


def is_quota_error(exc: BaseException) -> bool:
    """An Azure error about quota (the one reason another tier may succeed), not a bug, a bad size or the network."""
    from azure.core.exceptions import HttpResponseError

    if not isinstance(exc, HttpResponseError):
        return False
    code = str(getattr(getattr(exc, "error", None), "code", None) or "").lower()
    return code in QUOTA_CODES or "quota" in str(exc).lower()
