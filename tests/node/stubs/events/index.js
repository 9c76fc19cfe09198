'use strict';
// Never loaded by Node: require('events') resolves to the core module first.
module.exports = require('node:events');
