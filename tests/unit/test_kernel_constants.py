"""The kernels' constants, in C (ext/results.pxd) and in Python, are the proto contract's."""
import pytest

from engine.gen.txengine.v1 import ledger_pb2
from engine.kernels import _balance, results

C_CONSTANTS = _balance.kernel_constants()
TRANSFER_RESULT_NAMES = [n for n in ledger_pb2.TransferResult.keys()]
FLAG_NAMES = [n for enum in (ledger_pb2.TransferFlags, ledger_pb2.AccountFlags)
              for n in enum.keys() if not n.endswith("_UNSPECIFIED")]


def python_name(proto_name: str) -> str:
    """TRANSFER_RESULT_OK -> TRANSFER_OK; TRANSFER_FLAGS_LINKED -> TRANSFER_FLAG_LINKED."""
    for prefix, replacement in (("TRANSFER_RESULT_", "TRANSFER_"),
                                ("TRANSFER_FLAGS_", "TRANSFER_FLAG_"),
                                ("ACCOUNT_FLAGS_", "ACCOUNT_FLAG_")):
        if proto_name.startswith(prefix):
            return replacement + proto_name.removeprefix(prefix)
    raise AssertionError(proto_name)


def proto_value(proto_name: str) -> int:
    for enum in (ledger_pb2.TransferResult, ledger_pb2.TransferFlags, ledger_pb2.AccountFlags):
        if proto_name in enum.keys():
            return enum.Value(proto_name)
    raise AssertionError(proto_name)


def test_every_transfer_result_is_covered() -> None:
    assert len(TRANSFER_RESULT_NAMES) == 58  # UNSPECIFIED and 1..57
    assert ledger_pb2.TransferResult.Value("TRANSFER_RESULT_OK") == results.TRANSFER_OK == 1


@pytest.mark.parametrize("proto_name", TRANSFER_RESULT_NAMES + FLAG_NAMES)
def test_python_constant_equals_proto(proto_name: str) -> None:
    assert getattr(results, python_name(proto_name)) == proto_value(proto_name)


@pytest.mark.parametrize("proto_name", TRANSFER_RESULT_NAMES + FLAG_NAMES)
def test_c_constant_equals_proto(proto_name: str) -> None:
    assert C_CONSTANTS[proto_name] == proto_value(proto_name)


def test_no_constant_outside_the_contract() -> None:
    expected = set(TRANSFER_RESULT_NAMES + FLAG_NAMES) | {"BALANCE_MAX"}
    assert set(C_CONSTANTS) == expected
    python_names = {n for n in vars(results)
                    if n.startswith(("TRANSFER_", "ACCOUNT_FLAG_"))}
    assert python_names == {python_name(n) for n in TRANSFER_RESULT_NAMES + FLAG_NAMES}


def test_balance_max_is_the_largest_signed_64_bit_value() -> None:
    assert results.BALANCE_MAX == C_CONSTANTS["BALANCE_MAX"] == 2**63 - 1
